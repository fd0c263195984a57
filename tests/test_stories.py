from slm_export import stories, tokenizer


def test_deterministic_and_prefix_stable():
    first = list(stories.stories(50, seed=7))
    assert first == list(stories.stories(50, seed=7))
    assert first[:10] == list(stories.stories(10, seed=7))
    assert list(stories.stories(5, seed=8)) != first[:5]


def test_varied_stories_with_beginning_and_end():
    corpus = list(stories.stories(3000, seed=0))
    assert len(set(corpus)) >= 2990  # thousands of distinct stories
    openings = {s.split(",")[0].split(" named")[0] for s in corpus}
    assert len(openings) > 20
    for s in corpus[:200]:
        assert s[0].isupper() and s.rstrip().endswith((".", "!", '"'))
        assert 200 < len(s) < 2000
    words = {w for s in corpus for w in s.split()}
    assert len(words) > 400


def test_default_corpus_size_is_a_few_megabytes():
    sample = list(stories.stories(500))
    mean_chars = sum(map(len, sample)) / len(sample)
    assert 1.5e6 < mean_chars * 10_000 < 10e6  # default stories=10,000
    tokens = sum(len(tokenizer.encode(s)) for s in sample[:100]) / 100
    assert 60 < tokens < 250  # a story fits in one or two 128-token windows
