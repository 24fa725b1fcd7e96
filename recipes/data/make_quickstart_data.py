"""Generate the built-in quickstart instruction dataset (alpaca format, no third-party text).

Every row is produced by code from a template and has an exact answer, so a small student can be
trained and scored (Rouge-L) on it in minutes on a CPU. Six task families, equally represented:

- ``arithmetic``: small additions, subtractions and multiplications.
- ``units``: centimeters <-> meters, minutes <-> hours, kilograms <-> grams.
- ``sorting``: a few words alphabetically, a few numbers ascending or descending.
- ``spelling``: a word backwards, its letter count, its first or last letter.
- ``rewriting``: upper-case a phrase, pluralise a noun, put a short sentence in the past tense.
- ``facts``: capitals, colors of things, opposites, animal sounds (from tables below).

Held-out rule: each family has its own seeded RNG and draws examples, cycling through its kinds
(e.g. +, -, *) so every split is balanced, rejecting any (instruction, input) pair already used
anywhere. The first draws fill test, the next dev, the rest train, so no (instruction, input) pair
is in two splits. Table entities (countries, words, ...) are NOT split: every entity may appear in
every split, but a test question is always a different instance (another entity, template, number
or phrasing) from every train question; the same fact asked in another phrasing may be in train.

Usage: ``python recipes/data/make_quickstart_data.py [--out recipes/data]``
"""

from __future__ import annotations

import argparse
import json
import random
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Callable, TypedDict

SEED = 1234
SPLITS = ("test", "dev", "train")  # the order in which each family's drawn rows are dealt out
PER_FAMILY = {"test": 34, "dev": 17, "train": 334}  # x 6 families = 204 / 102 / 2004 rows
MAX_DRAWS = 20_000  # per example; the pools are larger than the quotas, so this is never reached


class Row(TypedDict):
    """One alpaca-format example."""

    instruction: str
    input: str
    output: str
    source: str


def _row(instruction: str, input_: str, output: str, source: str) -> Row:
    return {"instruction": instruction, "input": input_, "output": output, "source": source}


def _num(value: Fraction) -> str:
    """Plain decimal text of an exact, short decimal number: 5/2 -> '2.5', 3000 -> '3000'."""
    # exact: every value used here has a terminating decimal expansion of a few digits
    return format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")


def _unit(value: Fraction, singular: str, plural: str) -> str:
    return f"{_num(value)} {singular if value == 1 else plural}"


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# ---------------------------------------------------------------------------------------------
# Tables (written for this project)
# ---------------------------------------------------------------------------------------------

WORDS = [
    "apple", "river", "garden", "pencil", "window", "orange", "rabbit", "castle", "bottle",
    "planet", "forest", "candle", "jacket", "silver", "yellow", "winter", "summer", "button",
    "basket", "doctor", "ladder", "monkey", "pocket", "rocket", "spider", "tomato", "turtle",
    "wallet", "butter", "carpet", "dragon", "flower", "hammer", "island", "kitten", "lemon",
    "mirror", "needle", "pepper", "pillow", "puzzle", "school", "shadow", "sugar", "table",
    "tiger", "violin", "zebra", "bread", "chair", "cloud", "dance", "eagle", "grape", "horse",
    "house", "juice", "knife", "light", "money", "music", "night", "ocean", "paper", "queen",
    "smile", "stone", "train", "water", "cat", "dog", "sun", "moon", "book", "fish", "tree",
    "bird", "star", "milk", "ship", "farm", "road", "gold", "hat", "cup", "egg", "pen", "box",
]

ADJECTIVES = [
    "happy", "small", "red", "quiet", "old", "bright", "cold", "tall", "brave", "lazy", "green",
    "quick", "warm", "tiny", "busy", "shiny", "soft", "empty", "little", "clever",
]
DETERMINERS = ["the", "a", "my", "your", "our", "this"]

# noun -> plural
PLURALS = {
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "car": "cars",
    "house": "houses", "apple": "apples", "chair": "chairs", "table": "tables", "bird": "birds",
    "box": "boxes", "bus": "buses", "glass": "glasses", "dish": "dishes", "watch": "watches",
    "fox": "foxes", "church": "churches", "brush": "brushes", "class": "classes",
    "city": "cities", "baby": "babies", "party": "parties", "story": "stories", "lady": "ladies",
    "day": "days", "boy": "boys", "key": "keys", "toy": "toys", "leaf": "leaves",
    "knife": "knives", "wolf": "wolves", "wife": "wives", "half": "halves", "shelf": "shelves",
    "child": "children", "man": "men", "woman": "women", "mouse": "mice", "foot": "feet",
    "tooth": "teeth", "goose": "geese", "person": "people", "ox": "oxen", "sheep": "sheep",
    "fish": "fish", "deer": "deer", "potato": "potatoes", "hero": "heroes", "tomato": "tomatoes",
    "piano": "pianos", "photo": "photos", "cactus": "cacti",
}

# (present, past, rest of the sentence)
VERBS = [
    ("walk", "walked", "to school"), ("eat", "ate", "an apple"), ("drink", "drank", "some water"),
    ("play", "played", "football"), ("read", "read", "a book"), ("write", "wrote", "a letter"),
    ("see", "saw", "a bird"), ("go", "went", "to the park"), ("buy", "bought", "some bread"),
    ("cook", "cooked", "dinner"), ("sing", "sang", "a song"), ("watch", "watched", "a movie"),
    ("swim", "swam", "in the lake"), ("run", "ran", "home"), ("open", "opened", "the door"),
    ("make", "made", "a cake"), ("find", "found", "a coin"), ("clean", "cleaned", "the room"),
    ("paint", "painted", "the fence"), ("visit", "visited", "our friends"),
    ("build", "built", "a sandcastle"), ("catch", "caught", "the ball"),
    ("drive", "drove", "to work"), ("help", "helped", "the teacher"), ("take", "took", "the bus"),
    ("ride", "rode", "a bike"), ("draw", "drew", "a map"), ("wash", "washed", "the dishes"),
    ("sell", "sold", "the old car"), ("call", "called", "my mother"),
]
SUBJECTS = ["I", "We", "They", "You"]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo",
    "Canada": "Ottawa", "Australia": "Canberra", "India": "New Delhi", "Portugal": "Lisbon",
    "Greece": "Athens", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Hungary": "Budapest", "Belgium": "Brussels", "Kenya": "Nairobi", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Thailand": "Bangkok", "South Korea": "Seoul",
    "Turkey": "Ankara", "Iran": "Tehran", "Cuba": "Havana", "England": "London",
    "Vietnam": "Hanoi", "Nigeria": "Abuja", "Iceland": "Reykjavik", "Scotland": "Edinburgh",
    "Ukraine": "Kyiv", "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Pakistan": "Islamabad",
    "Saudi Arabia": "Riyadh", "Venezuela": "Caracas", "New Zealand": "Wellington",
    "Jamaica": "Kingston", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Lebanon": "Beirut", "Iraq": "Baghdad", "Ghana": "Accra",
    "Senegal": "Dakar", "Mexico": "Mexico City",
}

# thing (with its article, if any) -> color
COLORS = {
    "a banana": "yellow", "a lemon": "yellow", "grass": "green", "a lime": "green",
    "the sky": "blue", "snow": "white", "milk": "white", "coal": "black", "a crow": "black",
    "a tomato": "red", "a strawberry": "red", "a cherry": "red", "blood": "red",
    "a carrot": "orange", "a pumpkin": "orange", "chocolate": "brown", "coffee": "brown",
    "an eggplant": "purple", "a flamingo": "pink", "a polar bear": "white", "lettuce": "green",
    "a cucumber": "green", "a raven": "black", "a ruby": "red", "an emerald": "green",
    "a sapphire": "blue", "a fire truck": "red", "a tangerine": "orange", "a swan": "white",
    "a frog": "green", "a school bus": "yellow", "a canary": "yellow", "soot": "black",
}

# each word appears in only one pair, so the opposite is unambiguous in both directions
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("wet", "dry"), ("full", "empty"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("loud", "quiet"), ("rich", "poor"),
    ("strong", "weak"), ("thick", "thin"), ("push", "pull"), ("left", "right"), ("day", "night"),
    ("win", "lose"), ("buy", "sell"), ("black", "white"), ("in", "out"), ("on", "off"),
    ("yes", "no"), ("true", "false"), ("first", "last"), ("above", "below"),
    ("inside", "outside"), ("begin", "end"), ("love", "hate"), ("clean", "dirty"),
    ("question", "answer"), ("north", "south"), ("east", "west"), ("give", "take"),
    ("always", "never"), ("asleep", "awake"), ("friend", "enemy"), ("remember", "forget"),
    ("entrance", "exit"), ("top", "bottom"), ("front", "back"), ("add", "subtract"),
]

def _steps(step: Fraction, count: int) -> list[Fraction]:
    return [step * k for k in range(1, count + 1)]


# (from singular, from plural, to singular, to plural, to-units per from-unit, allowed values)
CONVERSIONS = [
    ("centimeter", "centimeters", "meter", "meters", Fraction(1, 100), _steps(Fraction(10), 99)),
    ("meter", "meters", "centimeter", "centimeters", Fraction(100), _steps(Fraction(1, 2), 40)),
    ("minute", "minutes", "hour", "hours", Fraction(1, 60), _steps(Fraction(15), 40)),
    ("hour", "hours", "minute", "minutes", Fraction(60), _steps(Fraction(1, 4), 40)),
    ("kilogram", "kilograms", "gram", "grams", Fraction(1000), _steps(Fraction(1, 2), 40)),
    ("gram", "grams", "kilogram", "kilograms", Fraction(1, 1000), _steps(Fraction(50), 80)),
]
UNIT_KINDS = [f"{entry[1]}>{entry[3]}" for entry in CONVERSIONS]  # e.g. "centimeters>meters"

# animal -> the sound word
SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "lion": "roar", "snake": "hiss", "owl": "hoot", "bee": "buzz",
    "rooster": "cock-a-doodle-doo", "mouse": "squeak", "frog": "ribbit", "donkey": "hee-haw",
    "chicken": "cluck", "turkey": "gobble", "crow": "caw", "dove": "coo", "goat": "maa",
    "wolf": "awoo", "bird": "tweet", "goose": "honk", "bear": "growl", "cricket": "chirp",
    "lamb": "baa", "pigeon": "coo",
}


# ---------------------------------------------------------------------------------------------
# Task families: each draws ONE random example; repeats are removed by the caller
# ---------------------------------------------------------------------------------------------


def make_arithmetic(rng: random.Random, kind: str) -> Row:
    """One addition, subtraction or multiplication, answered as ``a op b = c.``.

    Args:
        rng: the family's random generator.
        kind: one of ``"+"``, ``"-"``, ``"*"``.

    Returns:
        An alpaca row with ``source == "arithmetic"``.
    """
    if kind == "+":
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        c, verb = a + b, f"Add {a} and {b}."
    elif kind == "-":
        a = rng.randint(2, 99)
        b = rng.randint(1, a)  # keep results non-negative
        c, verb = a - b, f"Subtract {b} from {a}."
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        c, verb = a * b, f"Multiply {a} by {b}."
    expression = f"{a} {kind} {b}"
    instruction, input_ = rng.choice([(f"What is {expression}?", ""), (verb, ""),
                                      ("Calculate the following.", expression)])
    return _row(instruction, input_, f"{expression} = {c}.", "arithmetic")


def make_units(rng: random.Random, kind: str) -> Row:
    """One unit conversion (cm<->m, minutes<->hours, kg<->g) with an exact decimal answer.

    Args:
        rng: the family's random generator.
        kind: ``"<from unit>><to unit>"``, the first two names of a ``CONVERSIONS`` entry.

    Returns:
        An alpaca row with ``source == "units"``, e.g. output ``250 centimeters is 2.5 meters.``.
    """
    src_one, src_many, dst_one, dst_many, ratio, values = CONVERSIONS[UNIT_KINDS.index(kind)]
    value = rng.choice(values)
    src = _unit(value, src_one, src_many)
    instruction, input_ = rng.choice([(f"Convert {src} to {dst_many}.", ""),
                                      (f"How many {dst_many} are in {src}?", ""),
                                      (f"Convert this to {dst_many}.", src)])
    # every allowed value makes value * ratio a short terminating decimal, so _num is exact
    return _row(instruction, input_, f"{src} is {_unit(value * ratio, dst_one, dst_many)}.", "units")


def make_sorting(rng: random.Random, kind: str) -> Row:
    """Sort 3-5 words alphabetically or 3-6 numbers ascending/descending; the answer is the list.

    Args:
        rng: the family's random generator.
        kind: ``"words"``, ``"ascending"`` or ``"descending"``.

    Returns:
        An alpaca row with ``source == "sorting"``; input and output are comma-separated lists.
    """
    if kind == "words":
        words = rng.sample(WORDS, rng.randint(3, 5))
        instruction = rng.choice(["Sort these words in alphabetical order.",
                                  "Put these words in alphabetical order."])
        return _row(instruction, ", ".join(words), ", ".join(sorted(words)), "sorting")
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    if kind == "ascending":
        instruction = rng.choice(["Sort these numbers from smallest to largest.",
                                  "Sort these numbers in ascending order."])
    else:
        instruction = rng.choice(["Sort these numbers from largest to smallest.",
                                  "Sort these numbers in descending order."])
    answer = sorted(numbers, reverse=kind == "descending")
    return _row(instruction, ", ".join(map(str, numbers)), ", ".join(map(str, answer)), "sorting")


def make_spelling(rng: random.Random, kind: str) -> Row:
    """Spell a word backwards, count its letters, or give its first/last letter.

    Args:
        rng: the family's random generator.
        kind: ``"backwards"``, ``"count"``, ``"first"`` or ``"last"``.

    Returns:
        An alpaca row with ``source == "spelling"``; words and letters are quoted in the output.
    """
    word = rng.choice(WORDS)
    if kind == "backwards":
        questions = [(f'Spell the word "{word}" backwards.', ""), ("Spell this word backwards.", word)]
        output = f'The word "{word}" spelled backwards is "{word[::-1]}".'
    elif kind == "count":
        questions = [(f'How many letters are in the word "{word}"?', ""),
                     ("Count the letters in this word.", word)]
        output = f'The word "{word}" has {len(word)} letters.'
    else:
        letter = word[0] if kind == "first" else word[-1]
        questions = [(f'What is the {kind} letter of the word "{word}"?', ""),
                     (f"Give the {kind} letter of this word.", word)]
        output = f'The {kind} letter of "{word}" is "{letter}".'
    instruction, input_ = rng.choice(questions)
    return _row(instruction, input_, output, "spelling")


def make_rewriting(rng: random.Random, kind: str) -> Row:
    """Upper-case a short phrase, give a noun's plural, or put a short sentence in the past tense.

    Args:
        rng: the family's random generator.
        kind: ``"upper"``, ``"plural"`` or ``"past"``.

    Returns:
        An alpaca row with ``source == "rewriting"``.
    """
    if kind == "upper":
        determiner, words = rng.choice(DETERMINERS), f"{rng.choice(ADJECTIVES)} {rng.choice(WORDS)}"
        phrase = _article(words) if determiner == "a" else f"{determiner} {words}"  # "an old cat"
        instruction = rng.choice(["Rewrite this phrase in upper case.",
                                  "Convert this phrase to capital letters."])
        return _row(instruction, phrase, phrase.upper(), "rewriting")
    if kind == "plural":
        noun = rng.choice(sorted(PLURALS))
        instruction, input_ = rng.choice([(f'What is the plural of "{noun}"?', ""),
                                          (f'Write the plural form of "{noun}".', ""),
                                          ("Give the plural of this word.", noun)])
        return _row(instruction, input_, f'The plural of "{noun}" is "{PLURALS[noun]}".', "rewriting")
    subject = rng.choice(SUBJECTS)
    present, past, rest = rng.choice(VERBS)
    instruction = rng.choice(["Rewrite this sentence in the past tense.",
                              "Change this sentence to the past tense."])
    return _row(instruction, f"{subject} {present} {rest}.", f"{subject} {past} {rest}.", "rewriting")


def make_facts(rng: random.Random, kind: str) -> Row:
    """A fact from the tables above: a capital, a color, an opposite or an animal sound.

    Args:
        rng: the family's random generator.
        kind: ``"capital"``, ``"color"``, ``"opposite"`` or ``"sound"``.

    Returns:
        An alpaca row with ``source == "facts"``, answered in one short sentence.
    """
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        question = f"What is the capital of {country}?"
        asks = [f"Name the capital city of {country}.", f"Which city is the capital of {country}?",
                f"Tell me the capital of {country}."]
        output = f"The capital of {country} is {CAPITALS[country]}."
    elif kind == "color":
        thing = rng.choice(sorted(COLORS))
        question = f"What color is {thing}?"
        asks = [f"What is the color of {thing}?", f"Tell me the color of {thing}."]
        output = f"{thing[0].upper()}{thing[1:]} is {COLORS[thing]}."
    elif kind == "opposite":
        word, other = rng.choice(OPPOSITES)
        if rng.random() < 0.5:  # both directions: each word is in only one pair
            word, other = other, word
        question = f'What is the opposite of "{word}"?'
        asks = [f'Give the opposite of the word "{word}".', f'Name the opposite of "{word}".']
        output = f'The opposite of "{word}" is "{other}".'
    else:
        animal = _article(rng.choice(sorted(SOUNDS)))
        question = f"What sound does {animal} make?"
        asks = [f"What does {animal} say?", f"Which sound does {animal} make?",
                f"What noise does {animal} make?"]
        output = f'{animal.capitalize()} says "{SOUNDS[animal.split()[-1]]}".'
    # the plain question also comes as the input of a generic instruction
    choices = [(question, ""), ("Answer the question.", question)] + [(ask, "") for ask in asks]
    instruction, input_ = rng.choice(choices)
    return _row(instruction, input_, output, "facts")


# family -> (its kinds, dealt round-robin so every split is balanced, and its row maker)
TASKS: dict[str, tuple[list[str], Callable[[random.Random, str], Row]]] = {
    "arithmetic": (["+", "-", "*"], make_arithmetic),
    "units": (UNIT_KINDS, make_units),
    "sorting": (["words", "ascending", "descending"], make_sorting),
    "spelling": (["backwards", "count", "first", "last"], make_spelling),
    "rewriting": (["upper", "plural", "past"], make_rewriting),
    "facts": (["capital", "color", "opposite", "sound"], make_facts),
}


# ---------------------------------------------------------------------------------------------
# Splits and files
# ---------------------------------------------------------------------------------------------


def _draw_unique(rng: random.Random, make: Callable[[random.Random, str], Row], kind: str,
                 seen: set[tuple[str, str]]) -> Row:
    """Draw rows of one kind until one has an (instruction, input) pair not in ``seen``; add it."""
    for _ in range(MAX_DRAWS):
        row = make(rng, kind)
        key = (row["instruction"], row["input"])
        if key not in seen:
            seen.add(key)
            return row
    raise RuntimeError(f"task kind {kind!r} ran out of distinct examples")


def build_splits(seed: int = SEED, per_family: dict[str, int] | None = None) -> dict[str, list[Row]]:
    """Draw every family's unique examples and deal them out to test, then dev, then train.

    Args:
        seed: the base seed; each family gets its own generator so families are independent.
        per_family: rows per family for each split (defaults to ``PER_FAMILY``).

    Returns:
        ``{"test": [...], "dev": [...], "train": [...]}``, each shuffled across families.

    Raises:
        RuntimeError: a family's templates cannot produce enough distinct examples.
    """
    per_family = per_family or PER_FAMILY
    splits: dict[str, list[Row]] = {name: [] for name in SPLITS}
    seen: set[tuple[str, str]] = set()  # every (instruction, input) pair used in any split
    for index, (kinds, make) in enumerate(TASKS.values()):
        rng = random.Random(seed * 1000 + index)
        count = 0  # the kinds cycle across the splits, so each split holds them in equal shares
        for name in SPLITS:
            for _ in range(per_family[name]):
                splits[name].append(_draw_unique(rng, make, kinds[count % len(kinds)], seen))
                count += 1
    shuffler = random.Random(seed)
    for name in SPLITS:
        shuffler.shuffle(splits[name])
    return splits


def write_splits(out_dir: Path, seed: int = SEED) -> list[Path]:
    """Write ``quickstart-{train,dev,test}.jsonl`` into ``out_dir`` (one JSON object per line).

    Args:
        out_dir: the destination folder (created if missing).
        seed: the base seed passed to ``build_splits``.

    Returns:
        The paths written, in the order train, dev, test.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = build_splits(seed)
    paths = []
    for name in ("train", "dev", "test"):
        path = out_dir / f"quickstart-{name}.jsonl"
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in splits[name])
        path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``make_quickstart_data.py [--out DIR]``.

    Args:
        argv: arguments without the program name (``None`` reads ``sys.argv``).

    Returns:
        The process exit code (0).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: this script's folder)")
    args = parser.parse_args(argv)
    for path in write_splits(args.out):
        rows = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"wrote {path} ({rows} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
