"""Tool-calling requests, generated deterministically from a seed.

    python examples/tool_calling/generate.py          # writes train.jsonl and heldout.jsonl here

Each item shows three tools (their signatures in the prompt, their JSON schemas in `tools`) and
one user request. The expected answer (`reward_model.ground_truth`, what the json_match grader
reads) is one of:
- a tool call {"name", "arguments"} (~70 %): the request names every required argument;
- {"clarifying_question": true} (~15 %): the request fits a shown tool but leaves out a required
  argument, so the model must ask for it (a reply with '?' and no call);
- {"refusal": true} (~15 %): no shown tool can do it, so the model must not call one.
Train and held-out requests come from different seeds and never share a prompt.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset_split import generator_main  # noqa: E402  (examples/dataset_split.py)

INSTRUCTION = (
    'To call a tool, reply with only JSON: {"name": "<tool>", "arguments": {...}}. '
    "Parameters marked ? are optional. If the request lacks a required parameter, ask for it. "
    "If no tool can do it, say you cannot."
)
TOOLS_SHOWN = 3

TOOLS = {
    "get_weather": {
        "description": "current weather",
        "parameters": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
    "set_timer": {
        "description": "start a timer",
        "parameters": {"minutes": {"type": "integer"}, "label": {"type": "string"}},
        "required": ["minutes"],
    },
    "send_email": {
        "description": "send an email",
        "parameters": {"to": {"type": "string"}, "subject": {"type": "string"}},
        "required": ["to", "subject"],
    },
    "convert_currency": {
        "description": "convert money",
        "parameters": {
            "amount": {"type": "number"},
            "source": {"type": "string"},
            "target": {"type": "string"},
        },
        "required": ["amount", "source", "target"],
    },
    "translate": {
        "description": "translate text",
        "parameters": {"text": {"type": "string"}, "language": {"type": "string"}},
        "required": ["text", "language"],
    },
    "play_music": {
        "description": "play a song",
        "parameters": {"song": {"type": "string"}, "artist": {"type": "string"}},
        "required": ["song"],
    },
    "book_table": {
        "description": "reserve a restaurant table",
        "parameters": {"restaurant": {"type": "string"}, "people": {"type": "integer"}},
        "required": ["restaurant", "people"],
    },
}

CITIES = [
    "Paris",
    "Tokyo",
    "Lima",
    "Oslo",
    "Cairo",
    "Denver",
    "Madrid",
    "Sydney",
    "Toronto",
    "Nairobi",
    "Berlin",
    "Seoul",
    "Dublin",
    "Austin",
    "Rome",
    "Delhi",
]
LABELS = ["tea", "pasta", "laundry", "eggs", "workout", "nap", "pizza", "rice"]
PEOPLE = ["anna@mail.com", "bob@work.org", "li@home.net", "sara@team.io", "omar@corp.com", "kim@site.org"]
SUBJECTS = ["Lunch", "Report", "Meeting", "Invoice", "Holiday", "Budget", "Party", "Schedule"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CAD", "INR"]
PHRASES = [
    "good morning",
    "thank you",
    "where is the station",
    "I am hungry",
    "see you soon",
    "how much is it",
]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Japanese", "Korean"]
SONGS = [
    ("Yesterday", "The Beatles"),
    ("Halo", "Beyonce"),
    ("Hello", "Adele"),
    ("Thriller", "Michael Jackson"),
    ("Imagine", "John Lennon"),
    ("Roxanne", "The Police"),
    ("Dreams", "Fleetwood Mac"),
]
RESTAURANTS = ["Luigi's", "Sakura", "The Oak", "Casa Verde", "Blue Fin", "Golden Wok"]
# Requests no tool here can do: the right reply calls nothing.
UNSUPPORTED = [
    "Order me a large pizza.",
    "Call my mother.",
    "Book a flight to {city}.",
    "Turn off the lights.",
    "Pay my phone bill.",
    "Find a hotel in {city}.",
    "Buy {n} train tickets to {city}.",
    "What is the capital of {country}?",
    "Post a photo to my profile.",
    "Lock the front door.",
    "Rent a car in {city} for {n} days.",
    "Write a poem about {thing}.",
    "Delete my last email.",
    "Order {n} books about {thing}.",
]
COUNTRIES = ["Peru", "Norway", "Kenya", "Chile", "Egypt", "Japan"]
THINGS = ["the sea", "autumn", "cats", "space", "trains", "music"]


def signature(name: str, schema: dict) -> str:
    """get_weather(city, unit?) - current weather; unit: celsius|fahrenheit"""
    params, notes = [], []
    for param, spec in schema["parameters"].items():
        kind = "" if spec["type"] == "string" else f": {'int' if spec['type'] == 'integer' else 'number'}"
        params.append(f"{param}{'' if param in schema['required'] else '?'}{kind}")
        if "enum" in spec:
            notes.append(f"{param}: {'|'.join(spec['enum'])}")
    return f"{name}({', '.join(params)}) - {schema['description']}" + (
        f"; {'; '.join(notes)}" if notes else ""
    )


def json_schema(name: str, schema: dict) -> dict:
    """The tool in the usual function-calling JSON schema form (kept in the item as `tools`)."""
    return {
        "name": name,
        "description": schema["description"],
        "parameters": {"type": "object", "properties": schema["parameters"], "required": schema["required"]},
    }


def tool_request(rng: random.Random, tool: str, complete: bool) -> tuple[str, dict]:
    """A request for `tool` and its arguments; with complete=False one required argument is left
    out of the request (the arguments returned are then unused)."""
    if tool == "get_weather":
        city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit", None])
        if not complete:
            return rng.choice(
                [
                    "What's the weather like?",
                    "Tell me the weather in {unit}.".format(unit=unit or "celsius"),
                    "Will it rain today?",
                ]
            ), {}
        if unit:
            return rng.choice(
                ["What's the weather in {c} in {u}?", "Give me the {c} temperature in {u}."]
            ).format(c=city, u=unit), {"city": city, "unit": unit}
        return rng.choice(
            ["What's the weather in {c}?", "How warm is it in {c} right now?", "Weather for {c}, please."]
        ).format(c=city), {"city": city}
    if tool == "set_timer":
        minutes, label = rng.randint(1, 90), rng.choice(LABELS + [None])
        if not complete:
            return rng.choice(
                ["Set a timer.", f"Start a {label or 'kitchen'} timer.", "I need a timer, please."]
            ), {}
        if label:
            return f"Set a {minutes} minute timer for the {label}.", {"minutes": minutes, "label": label}
        text = rng.choice(["Set a timer for {m} minutes.", "Start a {m} minute timer."]).format(m=minutes)
        return text, {"minutes": minutes}
    if tool == "send_email":
        to, subject = rng.choice(PEOPLE), rng.choice(SUBJECTS)
        if not complete:
            return rng.choice(
                [
                    f"Send an email to {to}.",
                    f"Email someone about the {subject.lower()}.",
                    f"Write to {to} for me.",
                ]
            ), {}
        return rng.choice(
            ["Email {to} with the subject {subject}.", "Send {to} an email titled {subject}."]
        ).format(to=to, subject=subject), {"to": to, "subject": subject}
    if tool == "convert_currency":
        amount, (source, target) = (
            rng.choice([5, 10, 20, 25, 50, 75, 100, 250, 500, 1000]),
            rng.sample(CURRENCIES, 2),
        )
        if not complete:
            return rng.choice(
                [
                    f"Convert {source} to {target}.",
                    f"How much is {amount} {source} worth?",
                    f"Change some money into {target}.",
                ]
            ), {}
        return rng.choice(["Convert {a} {s} to {t}.", "How much is {a} {s} in {t}?"]).format(
            a=amount, s=source, t=target
        ), {"amount": amount, "source": source, "target": target}
    if tool == "translate":
        phrase, language = rng.choice(PHRASES), rng.choice(LANGUAGES)
        if not complete:
            return rng.choice([f"Translate '{phrase}'.", f"Translate something into {language}."]), {}
        return rng.choice(["Translate '{p}' into {l}.", "How do you say '{p}' in {l}?"]).format(
            p=phrase, l=language
        ), {"text": phrase, "language": language}
    if tool == "play_music":
        song, artist = rng.choice(SONGS)
        if not complete:
            return rng.choice(["Play some music.", f"Play a song by {artist}.", "Put a song on."]), {}
        if rng.random() < 0.5:
            return f"Play {song} by {artist}.", {"song": song, "artist": artist}
        return rng.choice(["Play {s}.", "Put on {s}, please."]).format(s=song), {"song": song}
    if tool == "book_table":
        restaurant, people = rng.choice(RESTAURANTS), rng.randint(1, 10)
        if not complete:
            return rng.choice(
                [
                    f"Book a table at {restaurant}.",
                    f"Reserve a table for {people}.",
                    "Get me a dinner reservation.",
                ]
            ), {}
        return rng.choice(["Book a table for {n} at {r}.", "Reserve {r} for {n} people."]).format(
            n=people, r=restaurant
        ), {"restaurant": restaurant, "people": people}
    raise ValueError(f"no request templates for tool {tool!r}")


def make_item(rng: random.Random) -> dict:
    kind = rng.choices(["call", "clarify", "refuse"], weights=[70, 15, 15])[0]
    if kind == "refuse":
        shown = rng.sample(sorted(TOOLS), TOOLS_SHOWN)
        request = rng.choice(UNSUPPORTED).format(
            city=rng.choice(CITIES),
            n=rng.randint(2, 5),
            country=rng.choice(COUNTRIES),
            thing=rng.choice(THINGS),
        )
        truth = {"refusal": True}
    else:
        tool = rng.choice(sorted(TOOLS))
        shown = rng.sample([t for t in sorted(TOOLS) if t != tool], TOOLS_SHOWN - 1) + [tool]
        rng.shuffle(shown)
        request, arguments = tool_request(rng, tool, complete=kind == "call")
        truth = {"name": tool, "arguments": arguments} if kind == "call" else {"clarifying_question": True}
    tool_lines = "\n".join(signature(name, TOOLS[name]) for name in shown)
    prompt = f"Tools:\n{tool_lines}\n{INSTRUCTION}\nRequest: {request}"
    return {
        "messages": [{"role": "user", "content": prompt}],
        "tools": [json_schema(name, TOOLS[name]) for name in shown],
        "reward_model": {"ground_truth": truth},
    }


def main() -> None:
    generator_main(make_item, __doc__.splitlines()[0], Path(__file__).parent, seed=2024)


if __name__ == "__main__":
    main()
