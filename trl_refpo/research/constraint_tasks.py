"""Rule-verifiable instruction-following preference data: every prompt carries a constraint a checker decides.

Each :class:`ConstraintTask` is an instruction with a checkable constraint (arithmetic answer, word limit,
lowercase, comma-separated list, required last word, yes/no answer). ``chosen`` satisfies it; ``rejected``
misses it in the way a small instruction model does (the right content wrapped in extra words, one word too
many, a capital letter, a numbered list instead of commas, the closing word forgotten, an explanation after
"yes"). :func:`check` decides whether any response satisfies a task, so greedy generations can be scored
before and after training.

The generator is deterministic given a seed. Train and held-out tasks never share a prompt: topics, list
categories and yes/no questions are split into disjoint halves, and arithmetic operand pairs by a rule.

    >>> train, held_out = constraint_splits(num_train=256, num_eval=48, seed=0)
    >>> dataset = preference_dataset(train)   # conversational prompt / chosen / rejected
    >>> check(held_out[0], "some model output")
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from datasets import Dataset


SYSTEM_PROMPT = "You are a helpful assistant. Follow the instruction exactly."

# topic -> adjectives that describe it (used for short descriptions and sentences)
TOPICS = {
    "the ocean": ["vast", "deep", "salty", "blue", "cold"],
    "the sun": ["hot", "bright", "huge", "yellow", "distant"],
    "the moon": ["pale", "round", "quiet", "distant", "bright"],
    "a forest": ["green", "quiet", "dense", "shady", "old"],
    "a desert": ["dry", "hot", "sandy", "empty", "wide"],
    "winter": ["cold", "dark", "snowy", "long", "quiet"],
    "summer": ["warm", "sunny", "long", "bright", "lazy"],
    "a city": ["busy", "loud", "crowded", "bright", "tall"],
    "a river": ["long", "wet", "winding", "cool", "calm"],
    "a mountain": ["tall", "rocky", "steep", "cold", "old"],
    "cats": ["soft", "curious", "quiet", "playful", "clever"],
    "dogs": ["loyal", "friendly", "playful", "happy", "brave"],
    "coffee": ["hot", "dark", "bitter", "strong", "fresh"],
    "rain": ["wet", "cool", "grey", "soft", "steady"],
    "a library": ["quiet", "calm", "large", "old", "useful"],
    "music": ["loud", "happy", "lively", "sweet", "rhythmic"],
    "the sky": ["blue", "wide", "clear", "bright", "open"],
    "a garden": ["green", "fresh", "colorful", "calm", "sunny"],
    "snow": ["white", "cold", "soft", "quiet", "bright"],
    "bread": ["warm", "soft", "fresh", "golden", "tasty"],
}

PLURAL_TOPICS = {"cats", "dogs"}

CATEGORIES = {
    "fruits": ["apples", "bananas", "oranges", "grapes", "pears", "plums"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange"],
    "animals": ["lions", "tigers", "horses", "rabbits", "wolves", "bears"],
    "countries": ["France", "Japan", "Brazil", "Canada", "Egypt", "India"],
    "vegetables": ["carrots", "onions", "peas", "potatoes", "beans", "leeks"],
    "sports": ["soccer", "tennis", "golf", "hockey", "rugby", "swimming"],
    "planets": ["Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune"],
    "musical instruments": ["piano", "violin", "guitar", "drums", "flute", "cello"],
    "birds": ["sparrows", "eagles", "owls", "robins", "crows", "parrots"],
    "metals": ["iron", "gold", "silver", "copper", "zinc", "tin"],
    "flowers": ["roses", "tulips", "daisies", "lilies", "orchids", "poppies"],
    "tools": ["hammers", "saws", "drills", "wrenches", "pliers", "chisels"],
}

YES_NO_QUESTIONS = [
    ("Is the sun hot?", "yes"),
    ("Is ice colder than boiling water?", "yes"),
    ("Do fish live in water?", "yes"),
    ("Is two plus two equal to four?", "yes"),
    ("Can birds fly?", "yes"),
    ("Is the Earth round?", "yes"),
    ("Is grass usually green?", "yes"),
    ("Do cats have four legs?", "yes"),
    ("Is Paris in France?", "yes"),
    ("Is water wet?", "yes"),
    ("Is snow black?", "no"),
    ("Is the moon made of cheese?", "no"),
    ("Do dogs have wings?", "no"),
    ("Is ten smaller than three?", "no"),
    ("Can a fish walk on land?", "no"),
    ("Is the sky green?", "no"),
    ("Is fire cold?", "no"),
    ("Do trees grow on the moon?", "no"),
    ("Is a week eight days long?", "no"),
    ("Is London in Japan?", "no"),
]

END_WORDS = ["Done", "Finished", "Goodbye", "Amen"]
WORD_LIMITS = [3, 4, 5]
KINDS = ("arithmetic", "max_words", "lowercase", "comma_list", "end_word", "yes_no")


@dataclass(frozen=True)
class ConstraintTask:
    kind: str
    instruction: str
    chosen: str
    rejected: str
    params: dict = field(default_factory=dict, compare=False, hash=False)

    def messages(self, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return system + [{"role": "user", "content": self.instruction}]


# ------------------------------------------------------------------------------------------------ checkers
def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def check_arithmetic(response: str, answer: int) -> bool:
    """Only the number: the response is the integer, optionally followed by a full stop."""
    return re.fullmatch(r"\s*-?\d+\.?\s*", response) is not None and int(response.strip().rstrip(".")) == answer


def check_max_words(response: str, limit: int) -> bool:
    """Between one and ``limit`` words."""
    return 1 <= len(_words(response)) <= limit


def check_lowercase(response: str) -> bool:
    """Some letters, none of them upper case."""
    return any(char.isalpha() for char in response) and not any(char.isupper() for char in response)


def check_comma_list(response: str, count: int) -> bool:
    """One line of exactly ``count`` comma-separated items of one to three words, no numbering or bullets."""
    text = response.strip().rstrip(".")
    if not text or "\n" in text or re.search(r"(^|\s)(\d+[.)]|[-*•])\s", text):
        return False
    items = [item.strip() for item in re.split(r",|\band\b", text)]
    items = [item for item in items if item]
    return len(items) == count and all(1 <= len(_words(item)) <= 3 for item in items)


def check_end_word(response: str, word: str) -> bool:
    """The last word (ignoring closing punctuation and quotes) is ``word``, case-insensitively."""
    words = _words(response)
    return bool(words) and words[-1].strip("'").lower() == word.lower()


def check_yes_no(response: str, answer: str) -> bool:
    """Only ``yes`` or ``no`` (any case, optional full stop), and the right one."""
    return response.strip().rstrip(".!").strip().lower() == answer


CHECKERS = {
    "arithmetic": lambda task, response: check_arithmetic(response, task.params["answer"]),
    "max_words": lambda task, response: check_max_words(response, task.params["limit"]),
    "lowercase": lambda task, response: check_lowercase(response),
    "comma_list": lambda task, response: check_comma_list(response, task.params["count"]),
    "end_word": lambda task, response: check_end_word(response, task.params["word"]),
    "yes_no": lambda task, response: check_yes_no(response, task.params["answer"]),
}


def check(task: ConstraintTask, response: str) -> bool:
    """Whether ``response`` satisfies ``task``'s constraint."""
    return CHECKERS[task.kind](task, response)


# ---------------------------------------------------------------------------------------------- generators
def _is(topic: str) -> str:
    return "are" if topic in PLURAL_TOPICS else "is"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _arithmetic(rng: random.Random, held_out: bool) -> ConstraintTask:
    while True:  # operand pairs are split between train and held-out by the parity of a + 2b // 3
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        if ((a + 2 * b) // 3) % 2 == int(held_out):
            break
    answer = a + b
    wrapped = rng.choice([f"{a} + {b} = {answer}", f"The answer is {answer}.", f"{a} plus {b} is {answer}."])
    rejected = rng.choice([wrapped, wrapped, str(answer + rng.choice([-1, 1]))])
    return ConstraintTask(
        "arithmetic", f"What is {a} + {b}? Reply with only the number.", str(answer), rejected, {"answer": answer}
    )


def _adjective_phrase(adjectives: list[str]) -> str:
    """``a, b and c``: ``len(adjectives) + 1`` words (one word for a single adjective)."""
    return adjectives[0] if len(adjectives) == 1 else ", ".join(adjectives[:-1]) + f" and {adjectives[-1]}"


def _max_words(rng: random.Random, topics: list[str]) -> ConstraintTask:
    topic, limit = rng.choice(topics), rng.choice(WORD_LIMITS)
    adjectives = rng.sample(TOPICS[topic], len(TOPICS[topic]))
    chosen = _adjective_phrase(adjectives[: limit - 1])  # exactly `limit` words
    one_too_many = _adjective_phrase(adjectives[:limit])
    sentence = f"{topic} {_is(topic)} {adjectives[0]}, {adjectives[1]} and very {adjectives[2]}"
    rejected = one_too_many if rng.random() < 0.5 else sentence
    return ConstraintTask(
        "max_words",
        f"Describe {topic} in at most {limit} words.",
        _capitalise(chosen) + ".",
        _capitalise(rejected) + ".",
        {"limit": limit},
    )


def _lowercase(rng: random.Random, topics: list[str]) -> ConstraintTask:
    topic = rng.choice(topics)
    first, second = rng.sample(TOPICS[topic], 2)
    sentence = f"{topic} {_is(topic)} {first} and {second}."
    wording = rng.choice(["using only lowercase letters", "in lowercase letters only"])
    return ConstraintTask("lowercase", f"Write one sentence about {topic} {wording}.", sentence, _capitalise(sentence))


def _comma_list(rng: random.Random, categories: list[str]) -> ConstraintTask:
    category, count = rng.choice(categories), rng.choice([3, 4])
    items = rng.sample(CATEGORIES[category], count + 1)
    chosen = ", ".join(items[:count])
    rejected = rng.choice(
        [
            "\n".join(f"{index}. {_capitalise(item)}" for index, item in enumerate(items[:count], start=1)),
            "\n".join(f"- {_capitalise(item)}" for item in items[:count]),
            ", ".join(items),  # one item too many
        ]
    )
    number = {3: "three", 4: "four"}[count]
    return ConstraintTask(
        "comma_list",
        f"Name {number} {category}, separated by commas, and nothing else.",
        chosen,
        rejected,
        {"count": count},
    )


def _end_word(rng: random.Random, topics: list[str]) -> ConstraintTask:
    topic, word = rng.choice(topics), rng.choice(END_WORDS)
    first, second = rng.sample(TOPICS[topic], 2)
    sentence = f"{_capitalise(topic)} {_is(topic)} {first} and {second}."
    return ConstraintTask(
        "end_word",
        f"Write a short sentence about {topic}. End your reply with the word '{word}'.",
        f"{sentence} {word}.",
        sentence,
        {"word": word},
    )


def _yes_no(rng: random.Random, questions: list[tuple[str, str]]) -> ConstraintTask:
    question, answer = rng.choice(questions)
    other = "no" if answer == "yes" else "yes"
    explanation = {"yes": "that is true", "no": "that is not true"}[answer]
    rejected = rng.choice([f"{_capitalise(answer)}, {explanation}.", f"{_capitalise(other)}."])
    return ConstraintTask(
        "yes_no", f"Answer with only yes or no. {question}", f"{_capitalise(answer)}.", rejected, {"answer": answer}
    )


def _halves(items: list, held_out: bool) -> list:
    return [item for index, item in enumerate(items) if index % 2 == int(held_out)]


def generate_tasks(num_tasks: int, seed: int = 0, held_out: bool = False, kinds=KINDS) -> list[ConstraintTask]:
    """``num_tasks`` tasks cycling through ``kinds``, from the train or the held-out half of the content."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"Unknown constraint kinds {unknown}; known: {list(KINDS)}.")
    rng = random.Random(f"{seed}-{'held_out' if held_out else 'train'}")
    topics = _halves(list(TOPICS), held_out)
    categories = _halves(list(CATEGORIES), held_out)
    questions = _halves(YES_NO_QUESTIONS, held_out)
    makers = {
        "arithmetic": lambda: _arithmetic(rng, held_out),
        "max_words": lambda: _max_words(rng, topics),
        "lowercase": lambda: _lowercase(rng, topics),
        "comma_list": lambda: _comma_list(rng, categories),
        "end_word": lambda: _end_word(rng, topics),
        "yes_no": lambda: _yes_no(rng, questions),
    }
    return [makers[kinds[index % len(kinds)]]() for index in range(num_tasks)]


def constraint_splits(num_train: int = 256, num_eval: int = 48, seed: int = 0, kinds=KINDS):
    """Train tasks and held-out tasks: disjoint prompts, no duplicate held-out prompt, kinds balanced."""
    train = generate_tasks(num_train, seed, held_out=False, kinds=kinds)
    per_kind = -(-num_eval // len(kinds))
    held_out, seen = [], set()
    for task in generate_tasks(num_eval * 50, seed, held_out=True, kinds=kinds):
        if task.instruction not in seen and sum(t.kind == task.kind for t in held_out) < per_kind:
            seen.add(task.instruction)
            held_out.append(task)
        if len(held_out) == num_eval:
            return train, held_out
    raise ValueError(
        f"num_eval={num_eval} is more distinct held-out prompts than the task bank holds ({len(held_out)} found); "
        "use a smaller num_eval."
    )


def preference_dataset(tasks: list[ConstraintTask], system_prompt: str | None = SYSTEM_PROMPT) -> Dataset:
    """Conversational ``prompt`` / ``chosen`` / ``rejected`` rows (the tokenizer's chat template renders them)."""
    return Dataset.from_list(
        [
            {
                "prompt": task.messages(system_prompt),
                "chosen": [{"role": "assistant", "content": task.chosen}],
                "rejected": [{"role": "assistant", "content": task.rejected}],
            }
            for task in tasks
        ]
    )
