"""The embedded task generators and the tiny model's tokenizer and cache key."""
import torch

from pyinf.tasks import MATH_CLASSES, SENTENCE_CLASSES, math_problems, sentence_transformations
from pyinf.tasks.common import SEP
from pyinf.tasks.model import ModelConfig, WordTokenizer, cache_key, pretrain_texts
from pyinf.tasks.sentences import transform


def _structure(task, n_classes=10, n_train=90, n_test=10):
    assert len(task.train) == n_classes * n_train and len(task.test) == n_classes * n_test
    for split, per in ((task.train, n_train), (task.test, n_test)):
        labels = [e.label for e in split]
        assert labels == [c for c in range(n_classes) for _ in range(per)]  # class-major
    texts = [e.text for e in task.train + task.test]
    assert len(set(texts)) == len(texts)  # no duplicates, so no train/test leakage


def test_sentences_structure_and_determinism():
    a, b = sentence_transformations(seed=0), sentence_transformations(seed=0)
    assert a == b
    assert sentence_transformations(seed=1).train != a.train
    _structure(a)
    names = [c[0] for c in SENTENCE_CLASSES]
    assert len(set(names)) == 10 and a.class_names == tuple(names)
    for e in a.train + a.test:
        name, sentence = e.prompt.split(": ", 1)
        assert name == names[e.label]
        assert e.answer == transform(e.label, sentence)
        assert 3 <= len(sentence.split()) <= 5


def test_sentence_transformations_by_hand():
    s = "red fox eats cake"
    expected = {
        "blorf": "cake eats fox red",
        "zindle": "Red Fox Eats Cake",
        "quaxo": "RED FOX EATS CAKE",
        "mivet": "der xof stae ekac",
        "dranto": "cake eats fox red",
        "plusk": "fox eats cake red",
        "fendro": "cake fox eats red",
        "sorbik": "red eats",
        "wugga": "r f e c",
        "trelm": "rd fx ts ck",
    }
    for label, (name, _, _) in enumerate(SENTENCE_CLASSES):
        assert transform(label, s) == expected[name], name
    assert transform(4, "owl cat dog") == "cat dog owl"


def test_math_structure_and_answers():
    a = math_problems(seed=0)
    assert a == math_problems(seed=0) and math_problems(seed=3).train != a.train
    _structure(a)
    assert len({c[0] for c in MATH_CLASSES}) == 10
    ops = {"add": lambda n: n[1] + n[2], "subtract": lambda n: n[0] - n[1], "boxes": lambda n: n[0] * n[1],
           "share": lambda n: n[0] // n[1], "square": lambda n: 4 * n[0], "age": lambda n: n[0] + n[1],
           "train": lambda n: n[0] * n[1], "pages": lambda n: n[0] * n[1] + n[2],
           "garden": lambda n: n[0] * n[1], "stickers": lambda n: n[0] + n[1] - n[2]}
    import re

    for e in a.train + a.test:
        nums = [int(x) for x in re.findall(r"\d+", e.prompt)]
        name = MATH_CLASSES[e.label][0]
        if name == "add":
            nums = [0] + nums
        assert int(e.answer) == ops[name](nums), e.text
        assert int(e.answer) >= 0


def test_tokenizer_covers_everything_and_masks_the_prompt():
    tok = WordTokenizer()
    s, m = sentence_transformations(), math_problems()
    texts = [e.text for e in s.train + s.test + m.train + m.test] + pretrain_texts(400, 0)
    assert all(3 not in tok.encode(t) for t in texts)  # no unknown tokens
    b = tok.batch(s.train[:3], answer_only=True)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for k, e in enumerate(s.train[:3]):
        n_head = 1 + len(tok.encode(e.prompt + SEP))
        lab = b["labels"][k]
        assert (lab[:n_head] == -100).all()
        assert lab[n_head : n_head + len(tok.encode(e.answer))].tolist() == tok.encode(e.answer)
    full = tok.batch(s.train[:3], answer_only=False)["labels"]
    assert (full[:, 1:3] != -100).all()


def test_cache_key_changes_with_config_seed_and_data():
    s = sentence_transformations()
    base = cache_key(ModelConfig(), 0, 0, s.train)
    assert base == cache_key(ModelConfig(), 0, 0, s.train)
    assert base != cache_key(ModelConfig(hidden=32), 0, 0, s.train)
    assert base != cache_key(ModelConfig(), 1, 0, s.train)
    assert base != cache_key(ModelConfig(), 0, 0, s.train[:-1])
