"""A report as an older mutwo wrote it (schema mutwo.report/1), made from a
committed H200 report by leaving out what schema /2 added."""

import json
import os

H200_BERT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "results", "h200_bert_bs16",
                         "report.json")
ADDED_IN_2 = {"nodes": ("module", "source", "param", "inputs", "storages", "simulated_during_bytes"),
              "activations": ("module", "source", "storage", "base", "recompute_replays_sep")}


def schema_1_report() -> dict:
    """BERT-base's H200 report, in schema /1."""
    with open(H200_BERT) as f:
        data = json.load(f)
    data["schema"] = "mutwo.report/1"
    for section in ("storages", "modules"):
        data.pop(section, None)
    for section, fields in ADDED_IN_2.items():
        for record in data[section]:
            for name in fields:
                record.pop(name, None)
    return data
