"""Checks that a ringmaster BERT output directory loads in Hugging Face transformers
unchanged and predicts what ringmaster measured.

Loads BEST_DIR with AutoModelForSequenceClassification / AutoTokenizer (no conversion),
fails on any missing or unexpected weight, scores the labelled TSV (label<TAB>text, the
file ringmaster validated on) with the same maximum length, and fails when its accuracy
differs from ringmaster's by more than one example.

  python check_transformers.py BEST_DIR VALIDATION_TSV MAX_LEN EXPECTED_ACCURACY
"""
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

best, tsv, max_len, expected = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
model, info = AutoModelForSequenceClassification.from_pretrained(best, output_loading_info=True)
problems = {k: v for k, v in info.items() if v}
if problems:
    sys.exit(f"transformers could not load {best} cleanly: {problems}")
tokenizer = AutoTokenizer.from_pretrained(best)
label2id = model.config.label2id
rows = [line.rstrip("\n").split("\t", 1) for line in open(tsv, encoding="utf-8") if line.strip()]
model.eval()
correct = 0
with torch.inference_mode():
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        encoded = tokenizer([text for _, text in chunk], truncation=True, max_length=max_len,
                            padding=True, return_tensors="pt")
        predicted = model(**encoded).logits.argmax(-1).tolist()
        correct += sum(p == label2id[label] for p, (label, _) in zip(predicted, chunk))
accuracy = correct / len(rows)
print(f"transformers {best}: accuracy {accuracy:.4f} on {len(rows)} rows "
      f"(ringmaster measured {expected:.4f}); {model.config.num_hidden_layers} layers, "
      f"labels {model.config.id2label}")
if abs(accuracy - expected) * len(rows) > 1.5:
    sys.exit("transformers and ringmaster disagree on this model")
