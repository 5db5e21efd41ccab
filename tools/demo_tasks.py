"""The demo model's chat tasks: short fixed prompts with checkable answers.

| task | user message | assistant reply |
| --- | --- | --- |
| add | ``add: 123 + 45`` | ``168`` (operands of 2-3 digits) |
| reverse | ``reverse: apple banana cherry`` | ``cherry banana apple`` (3-8 words from the reversal pool) |
| sort | ``sort: 5 3 9`` | ``3 5 9`` (3-8 numbers in 0..99, ascending) |
| continue | ``continue: <first half of a KJV verse>`` | the rest of the verse |

Reversal training lists draw from one of two pools (``REVERSAL_POOLS``):
``list``, the ~150 everyday nouns of ``WORDS`` (the shipped model's recipe),
or ``corpus``, the KJV corpus's whole vocabulary (plain lower-case words of
2-10 letters) plus ``WORDS``. Either way 1 in 16 corpus words outside
``WORDS`` (by a hash of the word) is held out of every training list, and
``reverse_unseen`` (evaluation only) reverses 3-8 of those held-out words
(3-8 letters): whether reversal generalises beyond the words it was trained
on (``unseen_reversal_items``).

Held-out items are disjoint from training by construction: an item is
held out when a hash of its task and key (the prompt; for ``continue`` the
verse reference) falls in a fixed bucket, and training samples only items
outside it. Held-out verses are also left out of pretraining
(``is_heldout_verse``). ``heldout_items(task, n)`` gives the same items on
every machine and is what ``benchmarks/eval_tasks.py`` scores.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from tools import demo_data

TASKS = ("add", "reverse", "sort", "continue")
REVERSAL_POOLS = ("list", "corpus")  # what reversal training lists draw from: WORDS, or the corpus vocabulary too
UNSEEN_REVERSE = "reverse_unseen"  # evaluation only: reversal of words no training list held
UNSEEN_WORD_LETTERS = (3, 8)  # unseen words are plain lower-case words of this many letters
HELDOUT_BUCKETS = 16  # 1 in 16 synthetic prompts is held out
WORD_HELDOUT_BUCKETS = 16  # 1 in 16 corpus words outside WORDS is never in a reversal training list
REVERSAL_WORD_LETTERS = (2, 10)  # reversal training lists: plain lower-case words of this many letters
VERSE_HELDOUT_BUCKETS = 50  # 1 in 50 verses is held out (also from pretraining)
CONTINUE_WORDS = (8, 20)  # verses used for continuation have this many words

WORDS = tuple("""
apple banana cherry grape lemon mango melon orange peach pear plum berry
olive onion carrot potato tomato bean corn rice bread cheese butter honey
salt sugar milk water tea coffee soup cake egg fish meat nut seed leaf
tree flower grass rose lily oak pine forest river lake sea ocean island
hill mountain valley desert field garden farm road bridge city town village
house door window roof wall floor table chair bed lamp clock mirror box
bag cup plate bowl spoon knife fork bottle basket book paper pen pencil
letter map card coin ring key bell drum flute piano guitar song dance
game ball kite boat ship train car bus truck bike plane rocket wheel
dog cat horse cow sheep goat pig duck hen bird eagle owl crow fox wolf
bear lion tiger deer rabbit mouse frog snake bee ant whale shark crab
sun moon star cloud rain snow wind storm fire ice stone sand gold silver
iron glass wood red blue green yellow black white brown pink purple gray
""".split())


@dataclass(frozen=True)
class Item:
    task: str
    prompt: str  # the user message
    answer: str  # the exact expected assistant reply
    key: str  # what the held-out split hashes: the prompt, or the verse reference

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def _bucket(text: str, buckets: int) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % buckets


def is_heldout(task: str, key: str) -> bool:
    if task == "continue":
        return is_heldout_verse(key)
    return _bucket(f"{task}\n{key}", HELDOUT_BUCKETS) == 0


def is_heldout_verse(ref: str) -> bool:
    return _bucket(f"verse\n{ref}", VERSE_HELDOUT_BUCKETS) == 0


def is_heldout_word(word: str) -> bool:
    """Whether ``word`` is kept out of every reversal training list (never one of ``WORDS``)."""
    return word not in WORDS and _bucket(f"word\n{word}", WORD_HELDOUT_BUCKETS) == 0


def reversal_words(verses: list[demo_data.Verse]) -> tuple[str, ...]:
    """What reversal training lists draw from: the corpus's plain lower-case
    words of 2-10 letters and ``WORDS``, less the held-out words; sorted."""
    corpus = plain_words(verses, REVERSAL_WORD_LETTERS)
    return tuple(sorted(w for w in corpus | set(WORDS) if not is_heldout_word(w)))


def plain_words(verses: list[demo_data.Verse], letters: tuple[int, int]) -> set[str]:
    """The corpus vocabulary's plain lower-case words (no apostrophes) of ``letters`` (lo, hi) letters."""
    lo, hi = letters
    return {w for w in demo_data.corpus_vocabulary(verses) if w.isalpha() and lo <= len(w) <= hi}


def _synthetic(task: str, rng: random.Random, words: tuple[str, ...]) -> Item:
    if task == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        prompt, answer = f"add: {a} + {b}", str(a + b)
    elif task == "reverse":
        ws = rng.sample(words, rng.randint(3, 8))
        prompt, answer = "reverse: " + " ".join(ws), " ".join(reversed(ws))
    elif task == "sort":
        ns = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
        prompt, answer = "sort: " + " ".join(map(str, ns)), " ".join(map(str, sorted(ns)))
    else:
        raise ValueError(f"unknown synthetic task {task!r}")
    return Item(task, prompt, answer, prompt)


def continuation(verse: demo_data.Verse) -> Item:
    ws = verse.text.split()
    half = len(ws) // 2
    return Item("continue", "continue: " + " ".join(ws[:half]), " ".join(ws[half:]), verse.ref)


class TaskSet:
    """Samples training items and lists held-out ones. Needs the corpus
    (``demo_data.load_verses``) for the continuation task and the
    ``corpus`` reversal pool."""

    def __init__(self, verses: list[demo_data.Verse], reversal_pool: str = "list"):
        if reversal_pool not in REVERSAL_POOLS:
            raise ValueError(f"unknown reversal pool {reversal_pool!r}; pools: {', '.join(REVERSAL_POOLS)}")
        lo, hi = CONTINUE_WORDS
        usable = [v for v in verses if lo <= len(v.text.split()) <= hi]
        self.train_verses = [v for v in usable if not is_heldout_verse(v.ref)]
        self.heldout_verses = [v for v in usable if is_heldout_verse(v.ref)]
        self.words = WORDS if reversal_pool == "list" else reversal_words(verses)

    def sample(self, task: str, rng: random.Random) -> Item:
        """A random training item (never a held-out one)."""
        if task == "continue":
            return continuation(rng.choice(self.train_verses))
        while True:
            item = _synthetic(task, rng, self.words)
            if not is_heldout(task, item.key):
                return item

    def heldout(self, task: str, n: int) -> list[Item]:
        """The first ``n`` held-out items of ``task``; the same on every run."""
        if task == "continue":
            order = random.Random("heldout-continue").sample(self.heldout_verses, len(self.heldout_verses))
            return [continuation(v) for v in order[:n]]
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        rng, items, seen = random.Random(f"heldout-{task}"), [], set()
        while len(items) < n:
            item = _synthetic(task, rng, self.words)
            if is_heldout(task, item.key) and item.key not in seen:
                seen.add(item.key)
                items.append(item)
        return items


def unseen_words(verses: list[demo_data.Verse]) -> list[str]:
    """Held-out words of the KJV corpus's vocabulary (``is_heldout_word``),
    which no reversal training list held: plain lower-case words (no
    apostrophes) of 3-8 letters, sorted."""
    return sorted(w for w in plain_words(verses, UNSEEN_WORD_LETTERS) if is_heldout_word(w))


def unseen_reversal_items(n: int, verses: list[demo_data.Verse] | None = None) -> list[Item]:
    """``n`` reversal items of 3-8 unseen words (``unseen_words``), the
    training prompt's format; the same on every run."""
    pool = unseen_words(verses if verses is not None else demo_data.load_verses())
    rng, items = random.Random(f"heldout-{UNSEEN_REVERSE}"), []
    for _ in range(n):
        ws = rng.sample(pool, rng.randint(3, 8))
        items.append(Item(UNSEEN_REVERSE, "reverse: " + " ".join(ws), " ".join(reversed(ws)), " ".join(ws)))
    return items


def heldout_items(task: str, n: int, cache: Path = demo_data.DEFAULT_CACHE) -> list[Item]:
    """Held-out evaluation items for one task (fetches the corpus if needed)."""
    return TaskSet(demo_data.load_verses(cache)).heldout(task, n)


def is_correct(item: Item, output: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return output.strip() == item.answer


def real_word_share(output: str, vocabulary: set[str]) -> float | None:
    """Share of the output's words that occur in the corpus (None when it has none)."""
    ws = demo_data.words(output)
    return sum(w in vocabulary for w in ws) / len(ws) if ws else None
