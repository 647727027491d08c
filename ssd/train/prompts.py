"""Generated training prompts: templates x topics per category, seeded. Never contains a prompt of
the held-out benchmark set (ssd/data/bench_prompts.jsonl)."""
from __future__ import annotations

import json
import random
from pathlib import Path

BENCH_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "bench_prompts.jsonl"

TOPICS = [
    "photosynthesis", "black holes", "the water cycle", "volcanoes", "the immune system", "climate change",
    "the French Revolution", "the Roman Empire", "the printing press", "electric cars", "solar panels",
    "the internet", "machine learning", "blockchain", "vaccines", "honey bees", "coral reefs", "the moon landing",
    "plate tectonics", "DNA", "the stock market", "inflation", "recycling", "sleep", "meditation", "coffee",
    "chess", "jazz music", "the Olympic Games", "rainforests", "earthquakes", "gravity", "magnets", "rainbows",
    "the human heart", "antibiotics", "3D printing", "quantum computers", "renewable energy", "bread baking",
    "gardening", "public libraries", "time management", "teamwork", "remote work", "healthy eating",
    "running a marathon", "learning a new language", "saving money", "the solar system", "tides", "dinosaurs",
    "the Great Wall of China", "ancient Egypt", "smartphones", "social media", "video games", "electricity",
    "airplanes", "bicycles", "the ocean", "deserts", "penguins", "wolves", "octopuses", "mushrooms", "tea",
    "volunteering", "job interviews", "public speaking", "cloud computing", "cybersecurity", "open-source software",
]

CODE_TASKS = [
    "reverses a string", "checks whether a word is a palindrome", "counts the vowels in a sentence",
    "merges two sorted lists", "finds the largest number in a list", "computes the factorial of n",
    "removes whitespace from both ends of a string", "flattens a nested list", "checks whether a year is a leap year",
    "converts Celsius to Fahrenheit", "counts word frequencies in a text", "finds the second smallest element of a list",
    "validates an email address with a simple rule", "computes the greatest common divisor of two numbers",
    "sorts a list of dictionaries by a key", "reads a CSV file and prints each row", "groups items by their first letter",
    "returns the unique elements of a list in order", "implements binary search", "chunks a list into pieces of size k",
    "checks whether two strings are anagrams", "computes a running average", "capitalises every word in a title",
    "finds all prime numbers below n", "rotates a list by k positions", "parses a date string into year, month and day",
]
LANGUAGES = ["Python", "JavaScript", "Java", "C", "Go", "Rust", "TypeScript", "C++", "Ruby", "Bash"]

TEMPLATES = {
    "chat": [
        "What is your favourite thing about {topic}?", "Can you tell me something fun about {topic}?",
        "I am curious about {topic}. Where should I start?", "Why do people find {topic} interesting?",
        "Give me some advice related to {topic}.", "What would you ask an expert on {topic}?",
    ],
    "explanation": [
        "Explain {topic} to a ten-year-old.", "How does {topic} work?", "Explain {topic} in simple terms.",
        "What is the science behind {topic}?", "Describe the history of {topic} briefly.",
        "What are common misconceptions about {topic}?",
    ],
    "lists": [
        "List five facts about {topic}.", "Give me three tips about {topic}.",
        "What are the pros and cons of {topic}?", "List some key terms related to {topic} with short definitions.",
        "Name four questions a student might ask about {topic}.",
    ],
    "summarisation": [
        "Write a short paragraph about {topic}, then summarise it in one sentence.",
        "Summarise what most people should know about {topic} in three sentences.",
        "Give a one-paragraph overview of {topic}.",
    ],
    "rewriting": [
        "Rewrite this sentence to sound more formal: {topic} is really cool and everyone should check it out.",
        "Make this sentence simpler: The phenomenon known as {topic} has been extensively studied by researchers.",
        "Rewrite as a friendly tweet: We are hosting a talk about {topic} next Friday at the town hall.",
        "Fix the grammar: me and my friend has been reading alot about {topic} lately.",
    ],
    "creative": [
        "Write a short poem about {topic}.", "Write a haiku about {topic}.",
        "Tell a very short story that involves {topic}.", "Write a product slogan inspired by {topic}.",
    ],
    "comparison": [
        "Compare {topic} and {other}.", "What do {topic} and {other} have in common?",
    ],
    "email": [
        "Write a short email inviting a colleague to a workshop about {topic}.",
        "Draft a polite message asking a teacher for resources on {topic}.",
    ],
}

CODE_TEMPLATES = [
    "Write a {lang} function that {task}.", "Write a {lang} function that {task}, and explain how it works.",
    "Show how to write code in {lang} that {task}, with comments.", "Write a {lang} function that {task}, then give an example call.",
]

MATH_TEMPLATES = [
    "What is {a} plus {b}? Show your work.", "What is {a} times {c}? Explain step by step.",
    "A box holds {c} apples. How many apples are in {d} boxes?",
    "Tom has {a} marbles and gives away {c}. How many are left? Show your steps.",
    "Solve for x: {c}x + {d} = {e}.", "What is {p} percent of {a}?",
    "A train travels {a} km in {d} hours. What is its average speed?",
    "If a shirt costs {c} dollars and is discounted by {p} percent, what is the new price?",
    "Is {a} a prime number? Explain.", "What is the area of a rectangle that is {c} m by {d} m?",
]


def bench_prompts() -> set[str]:
    return {json.loads(line)["prompt"] for line in BENCH_PROMPTS.read_text().splitlines() if line.strip()}


def _all_templated(rng: random.Random) -> list[dict]:
    out = []
    for cat, temps in TEMPLATES.items():
        for t in temps:
            for topic in TOPICS:
                other = rng.choice([x for x in TOPICS if x != topic])
                out.append({"category": cat, "prompt": t.format(topic=topic, other=other)})
    for t in CODE_TEMPLATES:
        for lang in LANGUAGES:
            for task in CODE_TASKS:
                out.append({"category": "code", "prompt": t.format(lang=lang, task=task)})
    return out


def _math(rng: random.Random) -> dict:
    t = rng.choice(MATH_TEMPLATES)
    nums = {"a": rng.randint(11, 999), "b": rng.randint(11, 999), "c": rng.randint(2, 40), "d": rng.randint(2, 12),
            "e": rng.randint(20, 200), "p": rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])}
    return {"category": "math", "prompt": t.format(**nums)}


def build_prompts(n: int, seed: int = 0) -> list[dict]:
    """n distinct prompts {"category", "prompt"}, categories interleaved, none from the bench set."""
    rng = random.Random(seed)
    pool = _all_templated(rng)
    rng.shuffle(pool)
    held_out = bench_prompts()
    out, seen = [], set(held_out)
    math_every = 8  # about one prompt in eight is arithmetic
    i = 0
    while len(out) < n:
        if len(out) % math_every == math_every - 1 or i >= len(pool):
            p = _math(rng)
        else:
            p, i = pool[i], i + 1
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    assert not held_out & {p["prompt"] for p in out}, "generated prompts overlap the held-out bench prompts"
    return out


def split_eval(prompts: list[dict], num_eval: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): every k-th prompt goes to eval, so both cover all categories."""
    step = max(1, len(prompts) // num_eval)
    eval_idx = set(range(0, len(prompts), step)[:num_eval])
    return ([p for i, p in enumerate(prompts) if i not in eval_idx], [p for i, p in enumerate(prompts) if i in eval_idx])
