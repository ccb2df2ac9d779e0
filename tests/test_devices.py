"""The one device/dtype default."""

import pytest
import torch

from osprey.devices import resolve_device, resolve_dtype


def test_defaults_follow_the_device():
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16


def test_an_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="'int8'"):
        resolve_dtype("int8", torch.device("cpu"))
