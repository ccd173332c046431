"""Writes the PyTorch baseline's SMS spam split (../shared/bench-baselines/reference/
spam_split.json: 0-based row indices of the TSV) as two TSV files, so ringmaster trains
and validates on exactly the baseline's rows.

  python3 spam_split.py SPLIT_JSON SPAM_TSV OUT_TRAIN_TSV OUT_VALIDATION_TSV
"""
import json
import sys

split_json, spam_tsv, train_out, val_out = sys.argv[1:5]
split = json.load(open(split_json))
rows = [line.rstrip("\n").rstrip("\r") for line in open(spam_tsv, encoding="utf-8")]
rows = [row for row in rows if row]
for name, path in (("train", train_out), ("val", val_out)):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows[i] + "\n" for i in split[name])
