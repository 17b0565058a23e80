"""Document processing for the offline zagreus tasks, copied in behaviour from lm-eval's okapi utils.

lm-eval imports this file by path (`!function utils.process_*`), so it must stay self-contained.
"""

import re

import datasets


def preprocess(text):
    """The okapi/HellaSwag clean-up: strip, WikiHow `[title]` markers to '. ', drop other [..] tags."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_okapi_arc(dataset: datasets.Dataset) -> datasets.Dataset:
    """As lm-eval okapi/arc_multilingual: 'Question: ...\\nAnswer:', options a..e, letter answer."""

    def _process_doc(doc):
        options = [doc.get(f"option_{x}") for x in "abcde"]
        return {
            "id": doc["id"],
            "query": "Question: " + preprocess(doc["instruction"]) + "\nAnswer:",
            "choices": [preprocess(option) for option in options if option],
            "gold": ["A", "B", "C", "D", "E"].index(doc["answer"]),
        }

    return dataset.map(_process_doc)


def process_okapi_hellaswag(dataset: datasets.Dataset) -> datasets.Dataset:
    """As lm-eval okapi/hellaswag_multilingual (fields ctx_a, ctx_b, activity_label, endings, label)."""

    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


def process_hellaswag_joined(dataset: datasets.Dataset) -> datasets.Dataset:
    """English HellaSwag from a file whose `ctx` already joins ctx_a and ctx_b.

    lm-eval's `hellaswag` capitalises the first letter of ctx_b; with the two parts joined that
    split is lost, so ctx is used as is (the only prompt difference from lm-eval's task).
    """

    def _process_doc(doc):
        return {
            "query": preprocess(doc["activity_label"] + ": " + doc["ctx"]),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)
