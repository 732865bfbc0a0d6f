"""The RULER-style suite: seeded prompts whose answers are in (or derivable from) the prompt, the
string_match_all scorer, confidence intervals, and a tiny LLM end to end."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from attnpatch.tools import ruler


def words(text: str) -> int:  # a stand-in tokenizer: whitespace words
    return len(text.split())


@pytest.mark.parametrize("task", ruler.TASKS)
def test_seeded_and_length_bounded(task):
    a = ruler.generate(task, 400, 3, words, seed=5)
    b = ruler.generate(task, 400, 3, words, seed=5)
    c = ruler.generate(task, 400, 3, words, seed=6)
    assert [s.prompt for s in a] == [s.prompt for s in b] and [s.answers for s in a] == [s.answers for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert len({s.prompt for s in a}) == 3  # samples differ from each other
    for s in a:
        assert 300 < words(s.prompt) <= 400, words(s.prompt)  # filled close to, never past, the length
        assert 0 <= s.chance < 1 and s.answers


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue"])
def test_niah_answer_is_the_asked_keys_needle(task):
    for s in ruler.generate(task, 500, 4, words, seed=1):
        key = re.search(r"magic numbers? for (\S+) mentioned", s.prompt).group(1)
        found = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d+)\.", s.prompt)
        assert sorted(found) == sorted(s.answers)
        others = re.findall(r"One of the special magic numbers for \S+ is: (\d+)\.", s.prompt)
        assert len(others) == {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4}[task]


def test_niah_depth_places_the_needle():
    s0, s1 = ruler.generate("niah_single", 2000, 2, words)  # depths 0.05 and 0.95
    pos = [s.prompt.index(s.answers[0]) / len(s.prompt) for s in (s0, s1)]
    assert pos[0] < 0.15 and pos[1] > 0.85


def test_vt_answer_is_the_chain_that_holds_the_value():
    for s in ruler.generate("vt", 600, 3, words, seed=2):
        value = re.search(r"assigned the value (\d+) in the text", s.prompt).group(1)
        assign = dict(re.findall(r"VAR (\w+) = (\w+)\.", s.prompt))
        resolve = lambda v: v if v.isdigit() else resolve(assign[v])  # noqa: E731
        assert sorted(v for v in assign if resolve(v) == value) == sorted(s.answers)


def test_cwe_and_fwe_answers_are_the_most_frequent_words():
    for s in ruler.generate("cwe", 800, 2, words, seed=3):
        counts = Counter(re.findall(r"\d+\. (\w+)", s.prompt.split("\nQuestion")[0]))
        top = {w for w, _ in counts.most_common(len(s.answers))}
        assert top == set(s.answers) and min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)
    for s in ruler.generate("fwe", 800, 2, words, seed=3):
        text = s.prompt.split("coded words. ", 1)[1].split(" ....")[0]
        counts = Counter(text.split())
        assert [counts[w] for w in s.answers] == sorted((c for c in counts.values()), reverse=True)[:3]


def test_score_is_string_match_all():
    assert ruler.score(" 1234567.", ["1234567"]) == 1.0
    assert ruler.score(" 1234568.", ["1234567"]) == 0.0
    assert ruler.score("They are: ABCDE, fghij and XYZ", ["abcde", "FGHIJ", "qqqqq", "xyz"]) == 0.75
    assert ruler.score("", ["a"]) == 0.0


def test_intervals():
    lo, hi = ruler.wilson(25, 50)
    assert lo == pytest.approx(0.3664, abs=1e-3) and hi == pytest.approx(0.6336, abs=1e-3)  # textbook Wilson, z = 1.96
    assert ruler.wilson(0, 50)[0] == 0.0 and ruler.wilson(50, 50)[1] == 1.0
    assert ruler.interval([1.0] * 25 + [0.0] * 25) == ruler.wilson(25, 50)
    part = [0.25, 0.5, 0.75, 1.0] * 10
    lo, hi = ruler.interval(part)
    assert lo < 0.625 < hi and ruler.interval(part) == (lo, hi)  # bootstrap around the mean, seeded


def test_tiny_llm_end_to_end():
    """Two samples through a tiny random Llama (dense and SinkWindow): prompts fit its context and
    the scorer runs on the decoded output; accuracy is meaningless here, so not asserted."""
    import attnpatch as ap
    from attnpatch.models import tiny

    model = tiny.llm("llama", max_position_embeddings=1024)
    encode = lambda text: [3 + b % 90 for b in text.encode()]  # noqa: E731  (a byte-level stand-in tokenizer)
    samples = ruler.generate("niah_single", 200, 2, lambda t: len(encode(t)) // 4)  # <= 800 bytes
    for method in (None, ap.SinkWindow(sink=4, window=64, evict=True)):
        for s in samples:
            ids = torch.tensor([encode(s.prompt)])
            with ap.patch(model, method) if method else torch.inference_mode():
                out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            text = "".join(chr(t) for t in out[0, ids.shape[1]:].tolist())
            assert out.shape[1] == ids.shape[1] + 4 and 0.0 <= ruler.score(text, s.answers) <= 1.0
