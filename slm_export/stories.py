"""The embedded default corpus: a deterministic generator of simple children's stories.

Written for this project (no third-party text). Each story has a hero, a place, a helper,
an object and a feeling, and follows one of several plots with a beginning, a problem, a
turn and an ending. Story ``i`` depends only on ``(seed, i)``, so any prefix of the corpus
is the same whatever its size, and the same seed always gives the same text.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

NAMES = [
    "Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Ella", "Jack",
    "Nora", "Finn", "Ruby", "Theo", "Ivy", "Owen", "Lucy", "Eli", "Maya", "Noah", "Rosa",
    "Kai", "Hana", "Omar", "Lena", "Jonas", "Tara", "Milo",
]
ANIMALS = [
    ("a little bunny", "the bunny"), ("a small bear", "the bear"), ("a kind dog", "the dog"),
    ("a tiny mouse", "the mouse"), ("a brave cat", "the cat"), ("a young fox", "the fox"),
    ("a happy duck", "the duck"), ("a curious bird", "the bird"), ("a slow turtle", "the turtle"),
    ("a silly frog", "the frog"), ("a gentle horse", "the horse"), ("a fluffy sheep", "the sheep"),
]
PLACES = [
    "the park", "the forest", "the beach", "the garden", "the farm", "the big hill",
    "the river", "the town", "the meadow", "the school yard", "the lake", "the zoo",
]
OBJECTS = [
    ("ball", "red"), ("kite", "blue"), ("hat", "yellow"), ("toy car", "green"),
    ("book", "old"), ("drum", "loud"), ("cup", "shiny"), ("shoe", "little"),
    ("flower", "pink"), ("box", "big"), ("blanket", "soft"), ("boat", "wooden"),
    ("bell", "golden"), ("crayon", "purple"), ("spoon", "silver"), ("balloon", "orange"),
]
FEELINGS = ["happy", "sad", "scared", "excited", "proud", "tired", "worried", "surprised"]
WEATHER = [
    "The sun was warm and bright.", "The sky was gray and it began to rain.",
    "A cool wind was blowing.", "It was a sunny morning.", "Snow was falling softly.",
    "The clouds looked like big white sheep.", "It was a quiet evening.",
]
OPENINGS = [
    "Once upon a time, there was {hero_a} named {name}.",
    "One day, {hero_a} named {name} woke up early.",
    "There once was {hero_a} called {name}.",
    "Long ago, in a small house near {place}, lived {hero_a} named {name}.",
    "{name} was {hero_a} who loved to play.",
]
LIKES = [
    "{name} liked to run and jump.", "{name} liked to sing songs.",
    "{name} loved to look at the stars.", "{name} liked to draw pictures.",
    "{name} loved to play with friends.", "{name} liked to help mom in the kitchen.",
]
MORALS = [
    "{name} learned that it is good to share.", "{name} learned that friends help each other.",
    "{name} learned to be brave, even when things are hard.",
    "{name} learned that saying sorry can fix a lot.",
    "{name} learned to be patient.", "{name} learned that being kind makes everyone happy.",
]
ENDINGS = [
    "From that day on, {name} and {friend} were best friends.",
    "That night, {name} went to bed with a big smile.",
    "And they all played together until the sun went down.",
    "{name} hugged {friend} and said, \"Thank you!\"",
    "It was the best day ever.",
    "They went home, happy and tired.",
]


@dataclass
class _Cast:
    name: str
    hero_a: str
    hero: str
    friend: str
    friend_a: str
    place: str
    thing: str
    color: str
    feeling: str
    he: str  # the hero's pronouns: he/him/his or she/her/her
    him: str
    his: str

    @property
    def He(self) -> str:  # noqa: N802 (reads like the sentence it builds)
        return self.he.capitalize()


def _pick_cast(rng: random.Random) -> _Cast:
    name = rng.choice(NAMES)
    if rng.random() < 0.5:
        hero_a, hero = rng.choice([("a little girl", "the girl"), ("a little boy", "the boy")])
    else:
        hero_a, hero = rng.choice(ANIMALS)
    friends = [a for a in ANIMALS if a[0] != hero_a]
    friends += [("a new friend", "the friend"), ("an old man", "the old man"),
                ("a wise owl", "the owl")]
    friend_a, friend = rng.choice(friends)
    thing, color = rng.choice(OBJECTS)
    girl = hero == "the girl" or (hero != "the boy" and rng.random() < 0.5)
    pronouns = ("she", "her", "her") if girl else ("he", "him", "his")
    return _Cast(name, hero_a, hero, friend, friend_a, rng.choice(PLACES), thing, color,
                 rng.choice(FEELINGS), *pronouns)


def _lost_thing(c: _Cast, rng: random.Random) -> list[str]:
    return [
        f"{c.name} had a {c.color} {c.thing}. {c.He} took it everywhere.",
        f"One day, {c.name} went to {c.place} with the {c.thing}.",
        rng.choice(WEATHER),
        f"{c.He} played and played. But when it was time to go home, the {c.thing} was gone!",
        f"{c.name} felt {rng.choice(['sad', 'worried', 'scared'])}. \"Where is my {c.thing}?\""
        f" {c.he} asked.",
        f"Then {c.name} saw {c.friend_a}. \"I can help you look,\" said {c.friend}.",
        f"They looked under a tree and behind a rock. "
        f"At last, {c.friend} found the {c.thing} "
        f"{rng.choice(['in the grass', 'near the water', 'under a bush', 'in a hole'])}.",
        f"{c.name} was so {rng.choice(['happy', 'glad', 'thankful'])} that {c.he} jumped up and down.",
    ]


def _sharing(c: _Cast, rng: random.Random) -> list[str]:
    return [
        f"{c.name} had a {c.color} {c.thing} and did not want to share it.",
        f"At {c.place}, {c.name} met {c.friend_a}. {c.friend.capitalize()} looked at the "
        f"{c.thing} and said, \"Can I play with it too?\"",
        f"\"No, it is mine!\" said {c.name}. {c.friend.capitalize()} felt sad and walked away.",
        f"Soon {c.name} felt lonely. Playing alone was not fun for {c.him}.",
        f"{c.name} ran to {c.friend} and said, \"I am sorry. Let us play together.\"",
        f"They took turns with the {c.thing} and laughed a lot.",
    ]


def _fear(c: _Cast, rng: random.Random) -> list[str]:
    scary, sense = rng.choice([("the dark", "saw"), ("the big dog next door", "saw"),
                               ("the loud thunder", "heard"), ("the deep water", "saw"),
                               ("the tall slide", "saw"), ("a strange noise", "heard")])
    return [
        f"{c.name} was scared of {scary}.",
        f"One evening, {c.name} went to {c.place} with {c.friend_a}.",
        rng.choice(WEATHER),
        f"Suddenly, {c.name} {sense} {scary} and wanted to run home.",
        f"{c.friend.capitalize()} held {c.name}'s hand. \"Do not be afraid. I am here,\" said "
        f"{c.friend}.",
        f"{c.name} took a deep breath. {c.He} took one small step, then another.",
        f"It was not so scary after all! {c.name} felt {rng.choice(['brave', 'proud', 'strong'])}.",
    ]


def _helping(c: _Cast, rng: random.Random) -> list[str]:
    trouble = rng.choice([
        "was stuck in a tree", "could not find the way home", "had a hurt leg",
        "dropped all the apples", "was cold and wet",
    ])
    return [
        f"{c.name} was walking to {c.place} when {c.he} heard a small voice.",
        f"It was {c.friend_a}. {c.friend.capitalize()} {trouble}.",
        f"\"Please help me,\" said {c.friend}.",
        f"{c.name} thought hard. Then {c.he} had an idea and used {c.his} {c.color} {c.thing} to help.",
        f"It worked! {c.friend.capitalize()} was safe and {rng.choice(['happy', 'warm', 'smiling'])}.",
        f"\"You are very kind,\" said {c.friend}. {c.name} felt {rng.choice(['proud', 'happy'])}.",
    ]


def _adventure(c: _Cast, rng: random.Random) -> list[str]:
    goal = rng.choice(["a secret door", "a shiny stone", "a tiny nest", "a rainbow",
                       "a small boat", "a map"])
    return [
        f"{c.name} wanted to go on an adventure.",
        f"{c.He} packed {c.his} {c.color} {c.thing} and some bread and went to {c.place}.",
        rng.choice(WEATHER),
        f"On the way, {c.name} met {c.friend_a}, who wanted to come too.",
        f"They walked for a long time. Then they found {goal}!",
        f"\"Wow!\" said {c.name}. They were very {rng.choice(['excited', 'surprised', 'happy'])}.",
        f"When the sun began to set, they went back home to tell everyone about {goal}.",
    ]


def _baking(c: _Cast, rng: random.Random) -> list[str]:
    food = rng.choice(["a cake", "cookies", "bread", "a pie", "soup"])
    return [
        f"{c.name} wanted to make {food} for {c.friend}.",
        f"{c.name} got flour, milk and eggs. {c.He} mixed and mixed.",
        f"Oh no! {c.name} {rng.choice(['dropped the eggs', 'spilled the milk', 'made a big mess'])}.",
        f"{c.name} felt {rng.choice(['sad', 'upset', 'worried'])}, but did not give up.",
        f"{c.He} cleaned up and tried again, slowly this time.",
        f"The {food.split()[-1]} was warm and good. {c.friend.capitalize()} said it was the best "
        f"{food.split()[-1]} ever.",
    ]


def _rainy_day(c: _Cast, rng: random.Random) -> list[str]:
    game = rng.choice(["built a fort with pillows", "played hide and seek", "made a puppet show",
                       "drew a big map", "sang silly songs"])
    return [
        f"{c.name} wanted to play at {c.place}, but it was raining.",
        f"{c.He} looked out of the window and felt {rng.choice(['sad', 'bored', 'grumpy'])}.",
        f"Then {c.friend_a} knocked on the door. \"Let us play inside!\" said {c.friend}.",
        f"So they {game}. They used {c.his} {c.color} {c.thing} too.",
        "Soon the rain stopped and a rainbow came out.",
        f"\"Rainy days can be fun,\" said {c.name}.",
    ]


def _new_friend(c: _Cast, rng: random.Random) -> list[str]:
    return [
        f"{c.name} moved to a new home near {c.place}.",
        f"{c.He} did not know anyone and felt {rng.choice(['shy', 'lonely', 'nervous'])}.",
        f"One day, {c.he} saw {c.friend_a} sitting alone.",
        f"{c.name} walked over and said, \"Hello! Do you want to play with my {c.thing}?\"",
        f"{c.friend.capitalize()} smiled. \"Yes, please!\"",
        f"They played all afternoon. {c.name} was not {rng.choice(['shy', 'lonely'])} anymore.",
    ]


PLOTS = [_lost_thing, _sharing, _fear, _helping, _adventure, _baking, _rainy_day, _new_friend]


def story(index: int, seed: int = 0) -> str:
    """The ``index``-th story of the corpus for ``seed``."""
    rng = random.Random(f"{seed}:{index}")
    c = _pick_cast(rng)
    fmt = vars(c)
    lines = [rng.choice(OPENINGS).format(**fmt)]
    if rng.random() < 0.6:
        lines.append(rng.choice(LIKES).format(**fmt))
    lines += rng.choice(PLOTS)(c, rng)
    if rng.random() < 0.5:
        lines.append(rng.choice(MORALS).format(**fmt))
    lines.append(rng.choice(ENDINGS).format(**fmt))
    text = " ".join(lines)
    return text[0].upper() + text[1:]


def stories(n: int, seed: int = 0, start: int = 0) -> Iterator[str]:
    """Stories ``start .. start + n - 1``."""
    for i in range(start, start + n):
        yield story(i, seed)
