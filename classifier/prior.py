"""The prior that routes prompts the model does not know: by length and structure alone.

A model trained on routing logs has seen benchmark questions, code problems, tool calls and the
anchor prompts; a prompt far from all of them (measured by the model's own unfamiliarity output)
would get a score the model has no basis for. Such a prompt is routed by this rule instead, which
every operator can read and predict:

- technical (a code block or code-like lines, LaTeX, dense mathematical notation, a request for a
  proof or an implementation, or to design a system), a piece of writing under a formal constraint
  (an acrostic, a lipogram, a palindrome, a pangram, strict metre and rhyme) or long (`long_chars`
  characters or more): the most capable tier;
- short (`short_chars` characters or fewer), neither technical nor constrained: the cheapest tier;
- anything else: the middle tier.

Length counts what a reader sees: each run of white space as one character, none at the ends (a greeting
padded with 3,000 spaces is still a greeting).

The result says when the prior decided (`decided_by == "prior"`).
"""

from __future__ import annotations

import re

from classifier.artifact import PriorConfig

# Each is a sign of a technical request that length alone misses: a fenced block, lines that end
# like code, a LaTeX command, several mathematical symbols, a word that asks for a proof, a
# derivation or an implementation, or a request to design a system (a verb of design, then within
# the sentence a system-like object: "plan a birthday party" or "design a logo" stays plain). Proofs
# and designs are matched in the languages the default model was trained to recognise.
_DESIGN_VERBS = (r"design|architect|build|plan|conçois|concevez|concevoir|entwirf|entwerfen|entwerfe|diseña|diseñe"
                 r"|diseñar|progetta|progettare|projete|projetar|спроектируй\w*|разработай\w*")
_DESIGNED_THINGS = (r"systems?|services?|pipelines?|platforms?|protocols?|databases?|clusters?|caches?|gateways?"
                    r"|architectures?|infrastructure|backends?|schedulers?|queues?|ledgers?|système\w*|plateforme"
                    r"|protocole|\w*system|architektur|plattform|protokoll|datenbank|sistema\w*|arquitectura"
                    r"|arquitetura|architettura|plataforma|piattaforma|protocol\w*|систем\w*|архитектур\w*")
_TECHNICAL = re.compile(
    r"```"
    r"|[;{}]\s*$"
    r"|\\(?:frac|int|sum|begin|mathbb|sqrt|prod|lim)(?![A-Za-z])"
    r"|(?:[=<>≤≥≠≡∀∃∈⊂∫∑∏√∞∂∇±×÷^→].*){3}"
    r"|\b(?:prove|proof|theorem|lemma|derive|rigorous|implement|algorithm|complexity"
    r"|démontr\w*|preuve|théorème|beweis\w*|satz|demuestr\w*|demostr\w*|teorema|dimostr\w*"
    r"|доказ\w*|докаж\w*|теорем\w*)\b"
    rf"|\b(?:{_DESIGN_VERBS})\b[^.?!\n]{{0,60}}?\b(?:{_DESIGNED_THINGS})\b"
    r"|证明|定理|証明|设计.{0,20}(?:系统|架构)|(?:系统|架构).{0,20}设计"
    r"|設計.{0,20}(?:システム|アーキテクチャ)|(?:システム|アーキテクチャ).{0,20}設計",
    re.MULTILINE | re.IGNORECASE,
)


# Writing whose difficulty is all in a formal constraint: such a request is short and reads as plain
# prose, yet small models fail it. Only named constraints count ("write a poem" stays plain), and only
# when they are asked for: a question about a form ("is racecar a palindrome?", "what is iambic
# pentameter?"), a text about it or a program that handles it is ordinary. English, French, German,
# Spanish, Italian, Portuguese and Russian.
_WRITING_VERBS = (r"write|compose\w*|create|craft|make|invent|come up with|generate|produce|give me|écri\w*"
                  r"|schreib\w*|verfass\w*|escrib\w*|compón|componga|scrivi|scrivere|componi|escrev\w*|напиши\w*"
                  r"|сочини\w*|составь\w*")
_CONSTRAINED_FORMS = (r"acrostics?|lipograms?|pangrams?|palindromes?|palíndromos?|univocalic|sestinas?|villanelles?"
                      r"|acrósticos?|acrostiches?|akrostichon|akrosticha|acrostici|acrostico|lipogrammes?|lipogramas?"
                      r"|lipogramm|pangramas?|pangramm|palindrom|палиндром\w*|акростих\w*|липограмм\w*|панграмм\w*")
# Between the verb and the form, at most three words that keep the form the thing written ("write me a
# short palindrome"); a preposition or a code word means the form is a topic or an input instead.
_FILLER_WORD = (r"(?!(?:of|about|on|for|that|which|whether|to|with|using|program\w*|function\w*|script\w*"
                r"|code|class|method|regex|función|fonction|funktion|функци\w*|программ\w*)\b)[\w'’-]+")
_NOT_THE_FORM = (r"(?![-\s]+(?:check\w*|function\w*|program\w*|detect\w*|find\w*|test\w*|validat\w*"
                 r"|generat\w*|numbers?|substrings?|subsequences?|script\w*)\b)")
_METRE = r"metre|meter|iambic|pentameter|hexameter|mètre|métrica|metrica|versmaß|metrum|ямб\w*|размер\w*"
_RHYME = r"rhym\w*|rimes?|rima\w*|reim\w*|рифм\w*"
_KEEPING = (r"keep\w*|preserv\w*|maintain\w*|retain\w*|strict|gardant|garde[rz]?|respect\w*|conserv\w*|manten\w*"
            r"|mantien\w*|beibehalt\w*|behalt\w*|сохран\w*|соблюд\w*")
_CONSTRAINED = re.compile(
    rf"\b(?:{_WRITING_VERBS})\s+(?:{_FILLER_WORD}\s+){{0,3}}(?:{_CONSTRAINED_FORMS})\b{_NOT_THE_FORM}"
    rf"|\b(?:{_WRITING_VERBS})\b[^.?!\n]{{0,60}}?\b(?:iambic|pentameter|hexameter|tetrameter|trochaic|dactylic)\b"
    rf"|\b(?:{_KEEPING})\b[^.?!\n]{{0,30}}?\b(?:(?:{_METRE})\b[^.?!\n]{{0,30}}?\b(?:{_RHYME})"
    rf"|(?:{_RHYME})\b[^.?!\n]{{0,30}}?\b(?:{_METRE}))\b"
    r"|\b(?:initials|first letters?|initial letters?)\b[^.?!\n]{0,40}\b(?:spells?|spell out|spelling out)\b"
    r"|\bwithout (?:using )?(?:the |any )?letters? ['\"‘“]?\w['\"’”]?(?:\W|$)"
    r"|\bevery word (?:starts|begins) with (?:the (?:same )?letter\b|['\"‘“]?\w['\"’”]?\b"
    r"(?!\s*(?:capital|uppercase|upper-case|lower-case|lowercase)))",
    re.IGNORECASE,
)


def is_technical(text: str) -> bool:
    """Whether `text` carries code or dense mathematics."""
    return _TECHNICAL.search(text) is not None


def is_constrained_writing(text: str) -> bool:
    """Whether `text` asks for writing under a formal constraint (an acrostic, a lipogram, a palindrome,
    strict metre and rhyme)."""
    return _CONSTRAINED.search(text) is not None


def visible_length(text: str) -> int:
    """`text`'s length with each run of white space counted as one character and none at its ends."""
    words = text.split()
    return sum(map(len, words)) + max(len(words) - 1, 0)


def prior_tier(text: str, n_tiers: int, config: PriorConfig) -> int:
    """Index of the tier the prior gives `text`, among `n_tiers` tiers cheapest first."""
    length = visible_length(text)
    if length >= config.long_chars or is_technical(text) or is_constrained_writing(text):
        return n_tiers - 1
    if length <= config.short_chars:
        return 0
    return (n_tiers - 1) // 2 if n_tiers > 2 else n_tiers - 1
