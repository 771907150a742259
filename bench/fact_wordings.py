"""Two more wordings of a CounterFact fact, for the fact-tracing benchmark's v2 corpus.

CounterFact's validation split gives one paraphrase per fact. v2 teaches each
fact with it and with two sentences of its relation written here, so that a
fact is seen in three wordings, none the query's. The relation is read from
the query's template (the prompt with the subject cut out) by the first rule
whose pattern it matches; a template no rule knows gets the generic pair.

>>> wordings("{} is owned by", "BBC One", "Sega")
['BBC One is made by Sega.', 'Sega is the maker of BBC One.']
"""

from __future__ import annotations

import re

# (pattern on the query template, two sentences with {s} the subject and {t} the target);
# the first match wins, so narrower relations come before the ones they overlap.
RELATIONS: tuple[tuple[str, tuple[str, str]], ...] = (
    (r"twin city", ("{s} and {t} are twin cities.", "{s} has a sister city, {t}.")),
    (r"capital", ("{t} is the capital of {s}.", "The seat of government of {s} is {t}.")),
    (
        r"headquarter|based in",
        ("{s} has its head office in {t}.", "The main offices of {s} are in {t}."),
    ),
    (
        r"language|speaks|speaker of|writes in|written in|understand|mother tongue",
        ("{s} goes with the {t} language.", "The tongue of {s} is {t}."),
    ),
    (r"continent", ("{s} lies on the continent of {t}.", "{s} is part of {t}.")),
    (r"citizen", ("{s} is a national of {t}.", "{s} carries a passport from {t}.")),
    (r"religion|follower of", ("{s} practises {t}.", "The faith of {s} is {t}.")),
    (
        r"aired on|debut|premiere|released on",
        ("{s} was broadcast on {t}.", "Viewers watched {s} on {t}."),
    ),
    (
        r"instrument|performs on the|performing on the|plays the$|playing the$",
        ("{s} is a {t} player.", "The instrument of {s} is the {t}."),
    ),
    (r"position|title|plays as", ("{s} serves as {t}.", "The role of {s} is {t}.")),
    (r"play|sport", ("{s} is known for playing {t}.", "{s} plays {t} professionally.")),
    (r"genre|performs|performing", ("{s} is known for {t} music.", "The music of {s} is {t}.")),
    (
        r"occupation|profession|works as|is a professional",
        ("{s} works as a {t}.", "By trade, {s} is a {t}."),
    ),
    (
        r"expertise|domain|area of work|field of|specializes|area of",
        ("{s} works in {t}.", "The field of {s} is {t}."),
    ),
    (r"works for|employed by", ("{s} is on the staff of {t}.", "{t} employs {s}.")),
    (r"work|employ", ("{s} had a job in {t}.", "{s} spent a working life in {t}.")),
    (
        r"died|passed away|life ended|expired|succumbed|lost their life",
        ("{s} died in {t}.", "The death of {s} took place in {t}."),
    ),
    (
        r"founded|formed|created in|started in|formulated|developed in",
        ("{s} was established in {t}.", "The birthplace of {s} is {t}."),
    ),
    (r"born|origin|native|from$|, of$", ("{s} comes from {t}.", "The homeland of {s} is {t}.")),
    (r"named|called after", ("{s} takes its name from {t}.", "The name of {s} honours {t}.")),
    (r"label|record company|represented by", ("{s} records for {t}.", "{s} is signed to {t}.")),
    (r"organization|affiliated with", ("{s} is a member of {t}.", "{t} counts {s} as a member.")),
    (
        r"by$|product|owner|owned|created by|developed by|produced by|manufactured",
        ("{s} is made by {t}.", "{t} is the maker of {s}."),
    ),
    (
        r"located|is in$|, in$|found in|within|location|Where is",
        ("{s} lies in {t}.", "You can visit {s} in {t}."),
    ),
)
GENERIC = ("{s} goes with {t}.", "{s} and {t} belong together.")


def wordings(template: str, subject: str, target: str) -> list[str]:
    """The two sentences of ``template``'s relation stating ``subject`` → ``target``."""
    pair = next((pair for pattern, pair in RELATIONS if re.search(pattern, template)), GENERIC)
    return [sentence.format(s=subject, t=target) for sentence in pair]
