"""The relation-extraction example end to end on MiniLM, on hand-written sentences (slow).

No relation corpus ships inside a PyPI package that lmtune could bundle (searched: see the task's docs), so
the example trains on the user's own file; ``write_handmade`` writes the hand-written sentences below in the
documents layout (``python tests/test_relation_extraction_example.py data/relations.jsonl``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import lmtune

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "relation_extraction_handmade_minilm.yaml"

# (sentence, entities as (mention, type), relations as (head mention, relation, tail mention)), written by hand.
HANDMADE: list[tuple[str, list[tuple[str, str]], list[tuple[str, str, str]]]] = [
    ("Maria Lopez joined Siemens as an engineer in 2015.", [("Maria Lopez", "PER"), ("Siemens", "ORG")],
     [("Maria Lopez", "works_for", "Siemens")]),
    ("Tom Baker, who grew up in Leeds, now teaches at Oxford University.",
     [("Tom Baker", "PER"), ("Leeds", "LOC"), ("Oxford University", "ORG")],
     [("Tom Baker", "works_for", "Oxford University")]),
    ("Nokia has its headquarters in Espoo.", [("Nokia", "ORG"), ("Espoo", "LOC")], [("Nokia", "based_in", "Espoo")]),
    ("Born in Lagos, Chidi Okafor moved to Toronto in 2010.",
     [("Lagos", "LOC"), ("Chidi Okafor", "PER"), ("Toronto", "LOC")],
     [("Chidi Okafor", "born_in", "Lagos"), ("Chidi Okafor", "lives_in", "Toronto")]),
    ("Anna Schmidt lives in Munich with her two cats.", [("Anna Schmidt", "PER"), ("Munich", "LOC")],
     [("Anna Schmidt", "lives_in", "Munich")]),
    ("The analyst Raj Patel works for Infosys in Bangalore.",
     [("Raj Patel", "PER"), ("Infosys", "ORG"), ("Bangalore", "LOC")],
     [("Raj Patel", "works_for", "Infosys"), ("Infosys", "based_in", "Bangalore")]),
    ("Lego, a toy maker based in Billund, hired Sofie Jensen last spring.",
     [("Lego", "ORG"), ("Billund", "LOC"), ("Sofie Jensen", "PER")],
     [("Lego", "based_in", "Billund"), ("Sofie Jensen", "works_for", "Lego")]),
    ("Yuki Tanaka was born in Osaka and studied in Kyoto.", [("Yuki Tanaka", "PER"), ("Osaka", "LOC"),
                                                               ("Kyoto", "LOC")],
     [("Yuki Tanaka", "born_in", "Osaka")]),
    ("Pierre Martin met Claire Dubois in Lyon.", [("Pierre Martin", "PER"), ("Claire Dubois", "PER"),
                                                   ("Lyon", "LOC")], []),
    ("Samsung opened a new office in Austin.", [("Samsung", "ORG"), ("Austin", "LOC")], []),
    ("Ahmed Hassan has lived in Cairo all his life.", [("Ahmed Hassan", "PER"), ("Cairo", "LOC")],
     [("Ahmed Hassan", "lives_in", "Cairo")]),
    ("Volvo is headquartered in Gothenburg.", [("Volvo", "ORG"), ("Gothenburg", "LOC")],
     [("Volvo", "based_in", "Gothenburg")]),
    ("Lucia Rossi, a nurse at the Gemelli hospital, was born in Naples.",
     [("Lucia Rossi", "PER"), ("Gemelli hospital", "ORG"), ("Naples", "LOC")],
     [("Lucia Rossi", "works_for", "Gemelli hospital"), ("Lucia Rossi", "born_in", "Naples")]),
    ("Carlos Mendes criticised Petrobras during a visit to Brasilia.",
     [("Carlos Mendes", "PER"), ("Petrobras", "ORG"), ("Brasilia", "LOC")], []),
    ("Olga Ivanova is a software developer at Yandex.", [("Olga Ivanova", "PER"), ("Yandex", "ORG")],
     [("Olga Ivanova", "works_for", "Yandex")]),
    ("Heineken, the brewer from Amsterdam, sponsored the match.", [("Heineken", "ORG"), ("Amsterdam", "LOC")],
     [("Heineken", "based_in", "Amsterdam")]),
    ("James O'Neill resides in Dublin and commutes to Cork.", [("James O'Neill", "PER"), ("Dublin", "LOC"),
                                                               ("Cork", "LOC")],
     [("James O'Neill", "lives_in", "Dublin")]),
    ("Fatima Zahra was born in Casablanca in 1990.", [("Fatima Zahra", "PER"), ("Casablanca", "LOC")],
     [("Fatima Zahra", "born_in", "Casablanca")]),
    ("Toyota sued Honda in a court in Nagoya.", [("Toyota", "ORG"), ("Honda", "ORG"), ("Nagoya", "LOC")], []),
    ("Emma Wilson manages the sales team of Unilever.", [("Emma Wilson", "PER"), ("Unilever", "ORG")],
     [("Emma Wilson", "works_for", "Unilever")]),
    ("Piotr Nowak spent a weekend in Gdansk.", [("Piotr Nowak", "PER"), ("Gdansk", "LOC")], []),
    ("Spotify, founded in Stockholm, employs Erik Larsson as a designer.",
     [("Spotify", "ORG"), ("Stockholm", "LOC"), ("Erik Larsson", "PER")],
     [("Spotify", "based_in", "Stockholm"), ("Erik Larsson", "works_for", "Spotify")]),
    ("Mei Chen grew up in Chengdu and now lives in Shanghai.",
     [("Mei Chen", "PER"), ("Chengdu", "LOC"), ("Shanghai", "LOC")], [("Mei Chen", "lives_in", "Shanghai")]),
    ("Kofi Mensah was born in Accra.", [("Kofi Mensah", "PER"), ("Accra", "LOC")],
     [("Kofi Mensah", "born_in", "Accra")]),
    ("Airbus, based in Toulouse, signed a deal with Qantas.", [("Airbus", "ORG"), ("Toulouse", "LOC"),
                                                                ("Qantas", "ORG")],
     [("Airbus", "based_in", "Toulouse")]),
    ("David Cohen interviewed Sara Levi for a newspaper in Haifa.",
     [("David Cohen", "PER"), ("Sara Levi", "PER"), ("Haifa", "LOC")], []),
    ("Hannah Berg works as a lawyer for Deloitte.", [("Hannah Berg", "PER"), ("Deloitte", "ORG")],
     [("Hannah Berg", "works_for", "Deloitte")]),
    ("Ikea has its main office in Delft, said Lars Holm.", [("Ikea", "ORG"), ("Delft", "LOC"), ("Lars Holm", "PER")],
     [("Ikea", "based_in", "Delft")]),
    ("Diego Torres lives in Seville.", [("Diego Torres", "PER"), ("Seville", "LOC")],
     [("Diego Torres", "lives_in", "Seville")]),
    ("Nina Kowalski, born in Krakow, flew to Berlin for a conference.",
     [("Nina Kowalski", "PER"), ("Krakow", "LOC"), ("Berlin", "LOC")], [("Nina Kowalski", "born_in", "Krakow")]),
    ("Grace Kim is employed by Hyundai.", [("Grace Kim", "PER"), ("Hyundai", "ORG")],
     [("Grace Kim", "works_for", "Hyundai")]),
    ("Philips moved its headquarters to Amsterdam from Eindhoven.",
     [("Philips", "ORG"), ("Amsterdam", "LOC"), ("Eindhoven", "LOC")], [("Philips", "based_in", "Amsterdam")]),
    ("Omar Farouk made his home in Dubai.", [("Omar Farouk", "PER"), ("Dubai", "LOC")],
     [("Omar Farouk", "lives_in", "Dubai")]),
    ("Laura Costa admired Ferrari as a child in Maranello.", [("Laura Costa", "PER"), ("Ferrari", "ORG"),
                                                               ("Maranello", "LOC")],
     [("Ferrari", "based_in", "Maranello")]),
    ("Jonas Weber was born in Hamburg and works at Airbus.", [("Jonas Weber", "PER"), ("Hamburg", "LOC"),
                                                              ("Airbus", "ORG")],
     [("Jonas Weber", "born_in", "Hamburg"), ("Jonas Weber", "works_for", "Airbus")]),
    ("Ravi Kumar lives in Chennai and works for Tata.", [("Ravi Kumar", "PER"), ("Chennai", "LOC"), ("Tata", "ORG")],
     [("Ravi Kumar", "lives_in", "Chennai"), ("Ravi Kumar", "works_for", "Tata")]),
]


def handmade_documents() -> list[dict[str, object]]:
    """The sentences above as documents: character spans found in order, relations by entity index."""
    docs = []
    for text, mentions, relations in HANDMADE:
        entities, at = [], 0
        for mention, kind in mentions:
            start = text.index(mention, at)
            entities.append({"start": start, "end": start + len(mention), "type": kind})
            at = start + len(mention)
        names = [m for m, _ in mentions]
        docs.append({"text": text, "entities": entities,
                     "relations": [{"head": names.index(h), "tail": names.index(t), "relation": r}
                                   for h, r, t in relations]})
    return docs


def write_handmade(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in handmade_documents()), encoding="utf-8")
    return path


def test_handmade_spans_are_exact() -> None:
    for doc, (text, mentions, _) in zip(handmade_documents(), HANDMADE, strict=True):
        ents = doc["entities"]
        assert isinstance(ents, list)
        assert [text[e["start"]:e["end"]] for e in ents] == [m for m, _ in mentions]


@pytest.mark.slow
def test_example_trains_and_beats_its_starting_point(tmp_path: Path) -> None:
    data = write_handmade(tmp_path / "relations.jsonl")
    run = lmtune.train(EXAMPLE, overrides={"data.train": str(data), "output_dir": str(tmp_path / "run")},
                       show_progress=False)
    metrics = json.loads((run.path / "metrics.json").read_text())
    split = "test" if metrics.get("test") else "validation"
    tuned, start = metrics[split]["micro_f1"], metrics["starting_point"][split]["micro_f1"]
    assert tuned > start, (tuned, start)
    baselines = json.loads((run.path / "baselines.json").read_text())
    assert tuned > baselines["majority"]["metrics"][split]["micro_f1"]


if __name__ == "__main__":
    print(write_handmade(Path(sys.argv[1] if len(sys.argv) > 1 else "data/relations.jsonl")))
