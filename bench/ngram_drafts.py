"""How many tokens an n-gram drafter could give per forward pass, replayed without a model
(bench/RESULTS.md).

    python bench/ngram_drafts.py artifacts/bench/model-30m-300steps \
        --data artifacts/bench/data/stories-10000-s42

Greedy speculation emits exactly the plain greedy text, and a draft is kept as far as it
agrees with that text; so each drafter's steps can be counted on the plain greedy
continuations of a few prompts (200 tokens, the bench's length), with no model in the loop.
Prints tokens per step (a plain step: 1) and the share of drafts kept, for:
- ``NgramDrafter`` as shipped (2- to 3-token repeats of the row's own text) and variants;
- ``history oracle``: the longest continuation any earlier position of the row's own text
  would have drafted, chosen knowing the answer: a ceiling for prompt lookup;
- ``NgramDrafter(table=...)``: with the data folder's n-gram counts (``--ngram-data``).
"""

from __future__ import annotations

import argparse

from slm_export.runtime import GREEDY, generate, load_backend
from slm_export.runtime.ngram_table import NgramTable
from slm_export.runtime.speculative import NgramDrafter
from slm_export.tokenizer import encode

PROMPTS = ("Once upon a time", "One day, a little girl named", "Tom and his dog", "The sun was",
           "Lily wanted to", "There was a big", "Once upon a time, there was a boy named Ben.",
           "A cat")
NEW_TOKENS = 200


def replay(continuations: list[tuple[list[int], list[int]]], drafter_for, k: int) -> tuple[float, float]:
    """-> (tokens per step, share of drafted tokens kept); ``drafter_for(prompt, text)`` gives
    the ``propose(history, k)`` of one continuation."""
    steps = drafted = kept = 0
    for prompt, text in continuations:
        propose, done = drafter_for(prompt, text), 1  # the prefill gave text[0]
        while done < len(text):
            drafts = propose(prompt + text[:done], min(k, len(text) - done))
            run = 0
            while run < len(drafts) and drafts[run] == text[done + run]:
                run += 1
            steps, drafted, kept, done = steps + 1, drafted + len(drafts), kept + run, done + run + 1
    return sum(len(t) - 1 for _, t in continuations) / steps, kept / max(1, drafted)


def history_oracle(prompt: list[int], text: list[int]):
    """The longest draft any earlier position of the row could have copied, knowing the answer."""
    def propose(history: list[int], k: int) -> list[int]:
        answer, best = text[len(history) - len(prompt):], []
        for start in range(1, len(history)):
            copied = history[start:start + k]
            run = 0
            while run < len(copied) and copied[run] == answer[run]:
                run += 1
            best = max(best, copied[:run], key=len)
        return best
    return propose


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a run folder (best.pt) or an export folder")
    p.add_argument("--data", required=True, help="the prepared data folder the model trained on")
    args = p.parse_args()
    backend = load_backend("eager", args.model)
    continuations = []
    for prompt in PROMPTS:
        ids = encode(prompt)
        out = generate(backend, [ids], max_new_tokens=NEW_TOKENS, sampling=GREEDY, stop_id=None)
        continuations.append((ids, out.tokens[0]))
    table = NgramTable.from_data(args.data)

    def shipped(**kw):
        def drafter_for(prompt, text):
            drafter = NgramDrafter(**kw)
            return lambda history, k: drafter.propose([history], k)[0]
        return drafter_for

    print("| drafter | k | tokens per step | drafts kept |\n|---|---|---|---|")
    for name, drafter_for, k in (("NgramDrafter() (shipped)", shipped(), 4),
                                 ("NgramDrafter()", shipped(), 8),
                                 ("NgramDrafter(max_ngram=8)", shipped(max_ngram=8), 4),
                                 ("NgramDrafter(min_ngram=1)", shipped(min_ngram=1), 4),
                                 ("history oracle", history_oracle, 4),
                                 ("history oracle", history_oracle, 8),
                                 ("NgramDrafter(table=...)", shipped(table=table), 4),
                                 ("NgramDrafter(table=...)", shipped(table=table), 8)):
        tokens, kept = replay(continuations, drafter_for, k)
        print(f"| {name} | {k} | {tokens:.2f} | {kept:.0%} |")


if __name__ == "__main__":
    main()
