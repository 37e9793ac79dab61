import pytest

from routed_lora.env.reward import compute_score, exact_match, extract_answer, format_ok, normalize_answer


@pytest.mark.parametrize("text,expected", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  a   Cat!  ", "cat"),
    ("St. Louis", "st louis"),
    ("st . louis", "st louis"),
    ("An apple, the pear; a plum.", "apple pear plum"),
    ("Theatre", "theatre"),  # "the" inside a word stays
    ("anagram", "anagram"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_extract_answer_takes_the_last_complete_one():
    assert extract_answer("<answer> a </answer> x <answer>Paris</answer>") == "Paris"
    assert extract_answer("<answer>\n two\nlines </answer>") == "two\nlines"
    assert extract_answer("no tags") is None
    assert extract_answer("<answer> open only") is None
    assert extract_answer("<answer> x </answer> <answer> unclosed") == "x"


def test_exact_match_values():
    assert exact_match("The Beatles", ["beatles"]) == 1.0
    assert exact_match("beatles!", "The Beatles") == 1.0
    assert exact_match("rolling stones", ["beatles", "the rolling stones"]) == 1.0
    assert exact_match("beatle", ["beatles"]) == 0.0
    assert exact_match(None, ["x"]) == 0.0
    assert exact_match("", [""]) == 1.0


GOOD = ("<think> i need to search </think> <search> q </search> <information> doc </information> "
        "<think> ok </think> <answer> teldia </answer>")


def test_format_ok():
    assert format_ok(GOOD)
    assert format_ok("<think> x </think> <answer> y </answer>\n")
    assert not format_ok("<answer> y </answer> trailing")
    assert not format_ok("<think> <search> q </search> </think> <answer> y </answer>")  # nested
    assert not format_ok("<search> q </search> <answer> y </answer>")  # search without information
    assert not format_ok("<think> x </think>")  # no answer
    assert not format_ok("<answer> a </answer> <answer> b </answer>")  # two answers
    assert not format_ok("<information> x </information> <answer> y </answer>")  # information without search


def test_compute_score():
    assert compute_score(GOOD, ["Teldia"]) == 1.0
    assert compute_score(GOOD, ["other"]) == 0.0
    assert compute_score(GOOD, ["other"], format_score=0.1) == 0.1
    assert compute_score("<answer> other", ["other"], format_score=0.1) == 0.0
    assert compute_score(GOOD, ["teldia"], format_score=0.1, score=2.0) == 2.0
