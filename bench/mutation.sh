#!/usr/bin/env bash
# Mutation testing of one module against the fast tests that pin it (docs/testing.md); not in CI (slow).
#   bench/mutation.sh osprey/mask_extractor.py tests/test_mask_extractor.py
#   bench/mutation.sh "eval/metrics/*.py" tests/test_eval_metrics.py
# Runs in a temporary copy of the tracked files, so the checkout stays clean and several modules can run at once;
# MUTMUT_CHILDREN (default 2) parallel test processes. Prints the survivors; `cd` into the printed folder and
# `mutmut show NAME` to read one.
set -euo pipefail
module=$1; shift
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d /tmp/osprey-mutation.XXXXXX)
(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work")
cd "$work"
# Point [tool.mutmut] at this module and these tests only: each mutant then runs only the listed tests that
# reach the mutated function, instead of every slow server or training test that happens to call it.
python - "$module" "$@" <<'PY'
import json, re, sys
from pathlib import Path
module, tests = sys.argv[1], sys.argv[2:]
text = Path("pyproject.toml").read_text()
text = re.sub(r"\n\[tool\.mutmut\]\n(?:[^\[].*\n|\s*\n)*", "\n", text)
text += ("\n[tool.mutmut]\nsource_paths = [\"osprey\", \"serve\", \"eval\"]\n"
         f"only_mutate = {json.dumps([module])}\n"
         "also_copy = [\"tests\", \"train\", \"data_tools\", \"bench\", \"pyproject.toml\"]\n"
         f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
         "pytest_add_cli_args = [\"-p\", \"no:randomly\", \"-q\"]\n"
         # a mutant's test run is timed against the clean run; on a busy machine the default 1 s margin made
         # most mutants of a millisecond function 'time out' (not a verdict): allow 30 s
         "timeout_constant = 30.0\n")
Path("pyproject.toml").write_text(text)
PY
# One torch thread: mutmut forks a child per mutant, and a child forked after OpenMP's pool started can hang.
export OMP_NUM_THREADS=1
mkdir -p "$work/mutants"  # exists before Python starts: a missing PYTHONPATH entry would be cached as absent
export PYTHONPATH="$work/mutants"  # the mutated copy, not an installed checkout
mutmut run --max-children "${MUTMUT_CHILDREN:-2}" > mutmut.log 2>&1 || true
echo "mutation run in $work"
mutmut results --all true 2>/dev/null | awk '{print $NF}' | sort | uniq -c || true
mutmut results
