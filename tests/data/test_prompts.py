"""Prompt builders against strings written by hand from data.md §1.1, §2, §3 and nextquill.md §4."""

from __future__ import annotations

import pytest

from percausal_jax.data import TASKS, build_pair
from percausal_jax.data.prompts import AMAZON_SYSTEM, Prompt
from percausal_jax.data.records import TASK_SCHEMAS
from percausal_jax.errors import UserError

REVIEW_INPUT = ('Generate the review text written by a reviewer who has a given an overall rating of "4.0" for a '
                'product with description "A teapot.". The summary of the review text is "Solid".')
REVIEW = {"id": "r1", "task": "product_review", "input": REVIEW_INPUT, "output": "Pours well.", "profile": [
    {"overall": 5.0, "description": "A steel kettle.", "summary": "Fast", "reviewText": "Boils in a minute."},
    {"overall": "2", "description": "A mug.", "summary": "Meh", "reviewText": "Chipped."},
]}

LAMP3_INPUT = ("What is the score of the following review on a scale of 1 to 5? Just answer with 1, 2, 3, 4, or 5 "
               "without further explanation. review: Pretty good.")
LAMP3 = {"id": "l3", "task": "LaMP-3", "input": LAMP3_INPUT, "output": "4",
         "profile": [{"text": "Loved it", "score": "5"}, {"text": "Bad", "score": 1}]}

AMAZON = {"id": "a1", "task": "amazon_review", "input": "Kettle", "output": "Loved it.",
          "target": {"item_title": "Kettle", "item_description": "Steel, 1.7 l.", "rating": 5, "title": "Wow"},
          "profile": [
              {"item_title": "Mug", "item_description": "Blue.", "rating": 4.0, "title": "Nice", "text": "Holds tea.",
               "timestamp": 2},
              {"item_title": "Pot", "item_description": "Big.", "rating": 2, "title": "Meh", "text": "Leaks.",
               "timestamp": 1},
          ]}

LAMP1_INPUT = ('For an author who has written the paper with the title "Deep Nets", which reference is related? '
               'Just answer with [1] or [2] without explanation. [1]: "Conv Tricks" [2]: "Bird Songs"')


def test_every_schema_has_a_task_and_back():
    assert sorted(TASKS) == sorted(TASK_SCHEMAS)


def test_longlamp_review_exact():
    pair = build_pair(REVIEW, REVIEW["profile"], "drop")
    assert pair.personal == Prompt(None, (
        '"5.0" is a rating for the product with description "A steel kettle.". "Fast" is summary for '
        '"Boils in a minute." , and "2" is a rating for the product with description "A mug.". "Meh" is summary '
        'for "Chipped." . Following the given patterns ' + REVIEW_INPUT))
    assert pair.counterfactual == Prompt(None, REVIEW_INPUT)
    placeholder = build_pair(REVIEW, REVIEW["profile"], "placeholder")
    assert placeholder.personal == pair.personal
    assert placeholder.counterfactual == Prompt(None, "None. Following the given patterns " + REVIEW_INPUT)


def test_lamp3_exact():
    pair = build_pair(LAMP3, LAMP3["profile"], "drop")
    assert pair.personal.user == '5 is the score for "Loved it" , and 1 is the score for "Bad" . ' + LAMP3_INPUT
    assert pair.counterfactual.user == LAMP3_INPUT
    assert build_pair(LAMP3, LAMP3["profile"][:1], "placeholder").counterfactual.user == "None. " + LAMP3_INPUT


def test_amazon_nextquill_format_exact():
    pair = build_pair(AMAZON, AMAZON["profile"], "placeholder")
    assert pair.personal.system == pair.counterfactual.system == AMAZON_SYSTEM
    assert AMAZON_SYSTEM == ("Given the title and description of an item, along with the user's past reviews and "
                             "the output review rating and review title, generate a personalized item review for "
                             "the user.\n")
    assert pair.personal.user == (
        "[Item Title]: Kettle\n"
        "[Item Description]: Steel, 1.7 l.\n"
        "[User's Past Reviews]:\n"
        "[Review 1]:\n- [Item Title]: Mug\n- [Item Description]: Blue.\n- [Review Rating]: 4.0\n"
        "- [Review Title]: Nice\n- [Review Text]: Holds tea.\n"
        "[Review 2]:\n- [Item Title]: Pot\n- [Item Description]: Big.\n- [Review Rating]: 2.0\n"
        "- [Review Title]: Meh\n- [Review Text]: Leaks.\n"
        "\n"
        "[Output Review Rating]: 5.0\n"
        "[Output Review Title]: Wow\n")
    assert pair.counterfactual.user == (
        "[Item Title]: Kettle\n[Item Description]: Steel, 1.7 l.\n[User's Past Reviews]:\nNone\n"
        "[Output Review Rating]: 5.0\n[Output Review Title]: Wow\n")
    assert build_pair(AMAZON, AMAZON["profile"], "drop").counterfactual.user == (
        "[Item Title]: Kettle\n[Item Description]: Steel, 1.7 l.\n[Output Review Rating]: 5.0\n"
        "[Output Review Title]: Wow\n")


def test_lamp1_inserts_titles_after_the_word_title():
    record = {"id": "l1", "task": "LaMP-1", "input": LAMP1_INPUT, "profile": []}
    items = [{"title": "A", "abstract": "x"}, {"title": "B", "abstract": "y"}]
    after = ' "Deep Nets", which reference is related?'
    assert build_pair(record, items).personal.user.startswith(
        'For an author who has written the paper with the title, and "A", and "B"' + after)
    assert build_pair(record, items, "placeholder").counterfactual.user.startswith(
        "For an author who has written the paper with the title, and None" + after)
    assert build_pair(record, items, "drop").counterfactual.user == LAMP1_INPUT
    assert TASKS["LaMP-1"].query(record) == "Conv Tricks Bird Songs"


ONE_ITEM_CASES = [
    ("LaMP-2", {"description": "A robot falls in love.", "tag": "sci-fi"},
     "Which tag does this movie relate to among the following tags? description: A ship sinks.",
     'the tag for the movie: "A robot falls in love." is "sci-fi" . ', "A ship sinks."),
    ("LaMP-4", {"title": "Rain Again", "text": "It rained."}, "Generate a headline for the following article: Sun.",
     '"Rain Again" is the title for "It rained." . ', "Sun."),
    ("LaMP-5", {"title": "On Nets", "abstract": "We study nets."},
     "Generate a title for the following abstract of a paper: We study trees.",
     '"On Nets" is a title for "We study nets." . Following the given patterns ', "We study trees."),
    ("LaMP-6", {"title": "Lunch", "text": "See you at noon."}, "Generate a subject for the following email: Hi.",
     '"Lunch" is the title for "See you at noon." . ', "Hi."),
    ("LaMP-7", {"text": "sunny day!"}, "Paraphrase the following tweet without any explanation before or after it: "
     "rain again", '"sunny day!"  are written by a person. Following the given patterns ', "rain again"),
    ("topic_writing", {"summary": "My cat", "content": "She naps."}, "Generate the content for a reddit post Dogs",
     '"My cat" is a summary for "She naps." . Following the given patterns, ',
     "Generate the content for a reddit post Dogs"),
]


@pytest.mark.parametrize("task, item, inp, prefix, query", ONE_ITEM_CASES, ids=[c[0] for c in ONE_ITEM_CASES])
def test_one_item_templates_and_queries(task, item, inp, prefix, query):
    record = {"id": "x", "task": task, "input": inp, "profile": [item]}
    pair = build_pair(record, [item])
    assert pair.personal == Prompt(None, prefix + inp)
    assert pair.counterfactual == Prompt(None, inp)
    assert TASKS[task].query(record) == query


def test_abstract_items_keep_750_words_and_query_after_items():
    inp = 'Generate an abstract for the title "Trees" using the following items: 1. roots\n2. leaves'
    record = {"id": "g1", "task": "abstract_generation", "input": inp, "profile": []}
    item = {"title": "Nets", "abstract": " ".join(f"w{i}" for i in range(800))}
    kept = " ".join(f"w{i}" for i in range(750))
    assert build_pair(record, [item]).personal.user == (
        f'"{kept}" is the abstract for the title "Nets". Use the above abstracts as context to understand the style '
        f"and language of the user and, {inp}")
    assert TASKS["abstract_generation"].query(record) == "1. roots\n2. leaves"
    assert TASKS["abstract_generation"].query({**record, "input": "Write about trees"}) == "Write about trees"


def test_retrieval_documents_follow_the_reference_field_order():
    assert TASKS["product_review"].document(REVIEW["profile"][0]) == "5.0 Fast A steel kettle. Boils in a minute."
    assert TASKS["LaMP-4"].document({"title": "T", "text": "body"}) == "T body"
    assert TASKS["amazon_review"].query(AMAZON) == "Kettle Steel, 1.7 l."


def test_no_items_means_personal_equals_counterfactual():
    for mode in ("drop", "placeholder"):
        pair = build_pair(AMAZON, [], mode)
        assert pair.personal == pair.counterfactual


def test_bad_mode_and_unknown_task_are_user_errors():
    with pytest.raises(UserError, match="counterfactual mode 'empty': expected one of"):
        build_pair(LAMP3, [], "empty")
    with pytest.raises(UserError, match="record 'l3': field 'task': unknown task 'LaMP-8'"):
        build_pair({**LAMP3, "task": "LaMP-8"}, [])
