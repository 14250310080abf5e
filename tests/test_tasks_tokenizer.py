import random

import pytest

from evomerge.zoo.tasks import ALPHABET, heldout_split, make_task


@pytest.mark.parametrize("name", ["add", "rev", "sort", "shift", "copy", "len"])
def test_task_answers_follow_their_rule(name):
    task = make_task(name, 2, 6)
    rng = random.Random(1)
    for _ in range(50):
        prompt, answer = task.sample(rng)
        assert prompt.endswith("=")
        assert set(prompt + answer) <= set(ALPHABET)
        body = prompt[:-1].split(":", 1)[-1]
        if name == "add":
            a, b = body.split("+")
            assert int(answer) == int(a) + int(b)
        elif name == "rev":
            assert answer == body[::-1]
        elif name == "sort":
            assert answer == "".join(sorted(body))
        elif name == "shift":
            assert [ord(c) - ord(d) for c, d in zip(answer, body)] == [
                1 if d != "z" else -25 for d in body
            ]
        elif name == "copy":
            assert answer == body
        else:
            assert answer == str(len(body))


def test_heldout_splits_are_disjoint_and_deterministic():
    task = make_task("rev", 3, 6)
    sizes = {"validation": 40, "test": 40, "unlabeled": 40}
    a = heldout_split(task, 7, sizes)
    b = heldout_split(task, 7, sizes)
    c = heldout_split(task, 8, sizes)
    assert a == b
    assert a != c
    prompts = [p for rows in a.values() for p, _ in rows]
    assert len(prompts) == len(set(prompts)) == 120


def test_heldout_split_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="too small"):
        heldout_split(make_task("len", 1, 1), 0, {"test": 100})


def test_char_tokenizer_round_trips_and_reloads(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from evomerge.zoo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    text = "rev:abc=cba\n12+30=42\n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(again, PreTrainedTokenizerFast)
    assert again(text)["input_ids"] == ids
    assert again.eos_token == "\n" and again.pad_token_id is not None
