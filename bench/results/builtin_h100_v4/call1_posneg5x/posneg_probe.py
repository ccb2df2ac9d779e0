"""Where does the yes/no decision fail? The hidden states at the position that predicts Yes/No, at every layer,
probed (logistic regression, a one-layer MLP) from train-split questions to test-split questions.
Run: python posneg_probe.py MODEL N_TRAIN_SAMPLES DATA"""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from osprey.checkpoint import load_pretrained
from train.config import load_config
from train.recipe import dataset_from_config

model_dir, n = sys.argv[1], int(sys.argv[2])
data = Path(sys.argv[3] if len(sys.argv) > 3 else 'data/synth')
model, tok, _ = load_pretrained(model_dir); model.float().eval()
yes_id, no_id = tok.convert_tokens_to_ids('Yes'), tok.convert_tokens_to_ids('No')
def collect(split, count):
    cfg = load_config(raw={"stage": 3, "model": model_dir, "output_dir": "unused", "data": {"root": str(data), "template": "infer",
          "files": [{"path": f"{split}/stage3_pos_neg.json", "kind": "pos_neg"}]}})
    ds, collate, _ = dataset_from_config(cfg, tok, model.config)
    feats, ys, preds = [], [], []
    for start in range(0, min(count, len(ds)), 16):
        b = collate([ds[i] for i in range(start, min(start + 16, count, len(ds)))])
        with torch.no_grad():
            emb = model.embed_inputs(b["input_ids"], b["pixel_values"], list(b["masks"]))
            out = model.language_model(inputs_embeds=emb, attention_mask=b["attention_mask"], output_hidden_states=True)
        lab = b["labels"][:, 1:]
        rows, cols = torch.nonzero((lab == yes_id) | (lab == no_id), as_tuple=True)
        feats.append(torch.stack([h[rows, cols] for h in out.hidden_states], 1).numpy())
        ys.append((lab[rows, cols] == yes_id).numpy())
        lg = out.logits[rows, cols]
        preds.append((lg[:, yes_id] > lg[:, no_id]).numpy())
    return np.concatenate(feats), np.concatenate(ys), np.concatenate(preds)
xtr, ytr, ptr = collect('train', n); xte, yte, pte = collect('test', n // 3)
print(f"train q {len(ytr)} (yes {ytr.mean():.2f}) model acc train {np.mean(ptr == ytr):.3f}; test q {len(yte)} model acc {np.mean(pte == yte):.3f}")
for layer in range(xtr.shape[1]):
    lr = LogisticRegression(max_iter=2000, C=1.0).fit(xtr[:, layer], ytr)
    mlp = MLPClassifier((256,), max_iter=500, random_state=0, alpha=1e-3).fit(xtr[:, layer], ytr)
    print(f"layer {layer}: logistic train {lr.score(xtr[:, layer], ytr):.3f} test {lr.score(xte[:, layer], yte):.3f} | mlp train {mlp.score(xtr[:, layer], ytr):.3f} test {mlp.score(xte[:, layer], yte):.3f}")
