"""Anchor prompts: a generated prior for the two ends of difficulty that routing logs leave empty.

Benchmark logs hold questions, not conversation: no greeting, no "thanks!", no one-line fact any
model knows, no "fix the typo in this sentence", and few requests as hard as a research proof or
a system design with a page of constraints. A model trained on them alone has never seen either
end and places them by accident (a greeting can land on the top tier). Anchors are prompts of
*obvious* difficulty, generated here from templates and word lists, written as tier-labeled rows
(`tier` = the cheapest tier that answers well): easy ones on the cheapest tier, hard ones on the
top tier. Their outcomes are assumed, not measured, so they are kept apart: their own source name,
never in any evaluation, listed in the model card. They share no text with the probe suite (checked
when they are built: any anchor equal to a probe after normalisation is dropped).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence

ANCHOR_SOURCE = "anchors"

GREETINGS = [
    "hi", "hello", "hey", "hey there", "hi!", "hello there", "good morning", "good evening", "good afternoon",
    "yo", "hiya", "morning!", "howdy", "hi, how are you?", "how's it going?", "what's up?", "how are you doing today?",
    "thanks", "thank you", "thanks a lot!", "thank you so much", "cheers", "thx", "ok thanks", "great, thanks!",
    "bye", "goodbye", "see you later", "good night", "have a nice day", "ok", "okay", "cool", "nice", "got it",
    "perfect, that works", "awesome", "sounds good", "sure", "no problem", "lol", "haha that's funny",
    "bonjour", "salut", "merci", "merci beaucoup", "bonne nuit", "ça va ?", "coucou", "à bientôt",
    "hola", "buenos días", "gracias", "muchas gracias", "¿qué tal?", "adiós", "buenas noches",
    "hallo", "guten Morgen", "danke", "vielen Dank", "wie geht's?", "tschüss", "gute Nacht",
    "ciao", "buongiorno", "grazie", "grazie mille", "come stai?", "buonanotte",
    "olá", "bom dia", "obrigado", "obrigada", "tudo bem?", "tchau", "oi",
    "hoi", "goedemorgen", "dank je wel", "hej", "tack", "god morgon", "cześć", "dziękuję", "dzień dobry",
    "merhaba", "teşekkürler", "günaydın", "привет", "спасибо", "доброе утро", "как дела?", "пока",
    "你好", "谢谢", "早上好", "晚安", "再见", "こんにちは", "ありがとう", "おはよう", "おやすみなさい",
    "안녕하세요", "감사합니다", "مرحبا", "شكرا", "صباح الخير", "नमस्ते", "धन्यवाद", "γεια σου", "ευχαριστώ",
]
SMALL_TALK = [
    "how was your day?", "tell me a joke", "tell me a fun fact", "what's your name?", "are you a robot?",
    "can you help me?", "i'm bored", "what should i eat for lunch?", "recommend a movie for tonight",
    "say something nice", "what's a good name for a cat?", "i'm feeling tired today", "do you like music?",
    "what's your favourite colour?", "give me a random number between 1 and 10", "flip a coin",
    "suggest a name for my goldfish", "what day comes after Monday?", "tell me something interesting",
    "can you say hello to my friend Anna?", "i just got a new puppy!", "it's raining here",
    "what's a good snack?", "give me a word that rhymes with cat", "write a smiley face",
    "raconte-moi une blague", "dis-moi quelque chose de gentil", "cuéntame un chiste", "erzähl mir einen Witz",
    "dimmi una barzelletta", "me conta uma piada", "расскажи анекдот", "给我讲个笑话", "何か面白い話をして",
]
COUNTRIES = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
    ("Sweden", "Stockholm"), ("Thailand", "Bangkok"), ("Austria", "Vienna"), ("Cuba", "Havana"),
    ("South Korea", "Seoul"), ("Belgium", "Brussels"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"),
]
FACT_QUESTIONS = [
    "What is the capital of {country}?", "capital of {country}?", "Which city is the capital of {country}?",
    "What language do people speak in {country}?", "What continent is {country} in?",
    "Who wrote {book}?", "Who painted the {painting}?", "What is the chemical symbol for {element}?",
    "What is the boiling point of water in Celsius?", "How many legs does a {animal} have?",
    "What colour is a ripe {fruit}?", "How many days are there in {month}?", "What is the largest planet?",
    "How many continents are there?", "What is the opposite of {adjective}?", "What does {acronym} stand for?",
    "Is a {animal} a mammal?", "What is the plural of {noun}?", "How do you spell {word}?",
    "What is frozen water called?", "Which animal says moo?", "What do bees make?", "How many hours are in a day?",
    "What is the first letter of the alphabet?", "Which is bigger, the sun or the moon?",
    "Who was the first person on the moon?",
]
BOOKS = ["Romeo and Juliet", "Hamlet", "Pride and Prejudice", "1984", "Don Quixote", "The Odyssey", "Harry Potter",
         "Moby-Dick", "War and Peace", "Oliver Twist"]
PAINTINGS = ["Mona Lisa", "Starry Night", "The Scream", "Sunflowers", "Guernica"]
ELEMENTS = ["oxygen", "gold", "iron", "sodium", "carbon", "hydrogen", "silver", "helium", "potassium", "copper"]
ANIMALS = ["dog", "cat", "spider", "horse", "chicken", "cow", "ant", "bird", "dolphin", "whale", "bat", "snake"]
FRUITS = ["banana", "tomato", "lemon", "strawberry", "lime", "cherry", "blueberry", "orange"]
MONTHS = ["January", "February", "April", "June", "September", "December", "a leap-year February"]
ADJECTIVES = ["hot", "happy", "tall", "fast", "heavy", "early", "bright", "loud", "empty", "strong", "old"]
ACRONYMS = ["NASA", "CPU", "USB", "PDF", "UN", "DNA", "FAQ", "ASAP", "GPS", "ATM", "URL", "CEO", "HTTP", "RAM"]
NOUNS = ["mouse", "child", "box", "leaf", "tooth", "city", "knife", "potato", "foot", "person", "sheep"]
WORDS = ["necessary", "receive", "definitely", "separate", "tomorrow", "beautiful", "restaurant", "rhythm"]
SENTENCES = [
    "i has a apple", "she dont like coffee", "we was going to the park yesterday", "their going home now",
    "me and him goes to school", "the cat sleep on the sofa all day", "i seen that movie last week",
    "He go to work by bus every morning.", "Send me the file", "Give me the report by Friday",
    "The meeting is moved to 3pm.", "Can you call me back", "I want a refund now", "We need more chairs for the party.",
    "The weather is nice today.", "My brother plays football on Sundays.", "Please close the door.",
]
REWRITES = [
    "Fix the grammar: '{sentence}'", "correct this sentence: {sentence}", "Make this more polite: \"{sentence}\"",
    "Rewrite this in the past tense: {sentence}", "Make this sentence sound more formal: {sentence}",
    "Can you fix the spelling in: {sentence}", "Turn this into a question: {sentence}",
    "Shorten this: {sentence}", "Put this sentence in all caps: {sentence}", "Make this friendlier: {sentence}",
]
PHRASES = ["good morning", "thank you very much", "where is the train station?", "I love you", "how much is this?",
           "see you tomorrow", "happy birthday", "my name is Tom", "I am hungry", "the bill, please", "good luck",
           "excuse me", "what time is it?", "I don't understand", "nice to meet you"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Japanese", "Chinese", "Russian", "Dutch",
             "Korean", "Arabic", "Turkish", "Swedish", "Polish", "Greek"]
TRANSLATE = ["Translate '{phrase}' into {language}.", "how do you say {phrase} in {language}?",
             "{phrase} in {language}?", "What is '{phrase}' in {language}?", "Translate to {language}: {phrase}"]
EASY_CODE = [
    "Write a Python function that adds two numbers.", "How do I print hello world in {lang}?",
    "How do I reverse a string in {lang}?", "how to get the length of a list in python",
    "Write a {lang} loop that prints the numbers 1 to 10.", "How do I sort a list in {lang}?",
    "What does `len()` do in Python?", "How do I make a comment in {lang}?", "how to declare a variable in {lang}",
    "Write a function that returns the larger of two numbers in {lang}.",
    "How do I check if a number is even in {lang}?",
    "What is the difference between a list and a tuple in Python?", "How do I concatenate two strings in {lang}?",
    "how to read a text file in python", "What is HTML used for?", "How do I create an empty dictionary in Python?",
    "What does `git status` do?", "How do I make text bold in Markdown?",
    "How do I convert a string to an int in {lang}?",
]
CODE_LANGUAGES = ["Python", "JavaScript", "Java", "C#", "Go", "Ruby", "PHP", "TypeScript", "Rust", "Kotlin"]
UNITS = [("kilometres", "miles"), ("pounds", "kilograms"), ("Celsius", "Fahrenheit"), ("inches", "centimetres"),
         ("hours", "minutes"), ("litres", "millilitres"), ("metres", "feet")]
MATH = ["What is {a} + {b}?", "{a} + {b} = ?", "what's {a} times {b}", "What is {a} minus {b}?",
        "Convert {a} {u1} to {u2}.", "What is {p}% of {c}?", "Is {a} an even number?", "What is half of {c}?",
        "If I have {a} apples and eat {b}, how many are left?", "What is {a} divided by {d}?",
        "Which is larger, {a} or {b}?", "Round {x} to the nearest whole number.", "What is {a} squared?"]
FORMATTING = ["Sort these words alphabetically: {words}", "Put these in a numbered list: {words}",
              "Make this a comma-separated list: {words}", "Which of these is a fruit: {words}?",
              "Count the words: {words}", "Capitalize each word: {words}", "Write these in reverse order: {words}"]
WORD_SETS = ["banana, apple, cherry", "dog cat bird fish", "red, green, blue, yellow", "pen pencil paper eraser",
             "Monday Tuesday Sunday", "milk eggs bread butter", "car, bus, bicycle, train", "table chair lamp"]
LETTER_SUBJECTS = ["the team lunch", "my new address", "the project kickoff", "a delayed delivery",
                   "the school trip", "a birthday party", "the quarterly report", "the office move"]
LONG_EASY_TASKS = [
    "Can you fix the typos in this? Keep everything else the same.", "Summarise this in one sentence.",
    "What is the date mentioned in this message?", "Who sent this message?", "Translate this note into {language}.",
    "Make this email a bit more polite.", "Give this email a short subject line.", "List the names mentioned here.",
    "Is this message positive or negative?", "Pull out the action items as a short list.",
]
FILLER = [
    "Hi {name},", "I hope you are doing well and had a good weekend.", "Just a quick note about {subject}.",
    "We are planning to meet on {day} at {time} in the usual room.", "Please let me know if that works for you.",
    "I will bring the documents we talked about last time.", "If you can't make it, no worries, we can reschedule.",
    "Also, don't forget to bring your laptop and the charger.", "Thanks again for all your help with this.",
    "The budget was approved yesterday, so we can go ahead.", "Lunch will be provided for everyone who attends.",
    "I've attached the agenda and a map of the building.", "Parking is free after 5pm on weekdays.",
    "Looking forward to seeing you there.", "Best regards,", "{name2}",
]
NAMES = ["Jenna", "Tom", "Priya", "Lukas", "María", "Ahmed", "Sofia", "Chen", "Olga", "David", "Aisha", "Marco"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]

HARD_PROOFS = [
    "there are infinitely many primes congruent to 1 mod 4", "every finite integral domain is a field",
    "the Cantor set is uncountable and has measure zero", "a continuous function on a compact metric space is "
    "uniformly continuous", "the sum of the reciprocals of the primes diverges", "pi is irrational",
    "e is transcendental", "every planar graph is 5-colourable", "the fundamental group of the circle is Z",
    "a group of order p^2 is abelian", "the Riemann zeta function has no zeros on Re(s) = 1",
    "every bounded monotone sequence of reals converges", "the Brouwer fixed point theorem holds in dimension 2",
    "the halting problem is undecidable", "Sylow subgroups of a finite group are conjugate",
    "every vector space has a basis (using Zorn's lemma)", "the Banach-Tarski paradox follows from the axiom of choice",
    "a compact Hausdorff space is normal", "the Lebesgue dominated convergence theorem",
    "the Cauchy-Schwarz inequality in an arbitrary inner product space",
    "the spectral theorem for compact self-adjoint operators",
    "the number of partitions of n into odd parts equals the number into distinct parts",
    "SAT is NP-complete (the Cook-Levin theorem)", "the Hahn-Banach theorem for real normed spaces",
    "the Jordan curve theorem for polygons", "every ideal in a principal ideal domain is finitely generated and "
    "PIDs are UFDs", "the central limit theorem for i.i.d. variables with finite variance",
    "the max-flow min-cut theorem", "Hall's marriage theorem", "the Borsuk-Ulam theorem in dimension 2",
]
PROOF_FRAMES = ["Prove that {p}.", "Give a rigorous proof that {p}.", "prove {p}", "Show rigorously that {p}, "
                "stating every lemma you use.", "Write a complete, formal proof that {p}.",
                "Prove, with all details, that {p}."]
HARD_MATH = [
    "Compute the homology groups of the real projective plane with integer coefficients and justify each step.",
    "Find all integer solutions of x^3 + y^3 = z^3 + 1 with |x|,|y|,|z| < 100 and prove there are no others in range.",
    "Evaluate the integral of log(sin x) from 0 to pi and prove the result.", "Classify all groups of order 12 up to "
    "isomorphism, with proof.", "Determine the Galois group of x^5 - 4x + 2 over Q and prove your answer.",
    "Solve the heat equation on a rod of length L with mixed boundary conditions u(0,t)=0, u_x(L,t)=0 and derive "
    "the eigenfunction expansion.", "Derive the asymptotic expansion of the n-th Catalan number to three terms.",
    "Compute the Euler characteristic of the genus-g surface via a triangulation and prove it is 2 - 2g.",
]
SYSTEMS = ["a globally distributed payment ledger", "a real-time multiplayer game backend", "a search engine for "
           "10 billion documents", "a rate limiter for a public API with 50 regions", "a collaborative text editor "
           "like Google Docs", "a stock exchange matching engine", "a ride-hailing dispatch system",
           "a video streaming platform", "a distributed key-value store", "a notification service for 500M users"]
CONSTRAINTS = ["p99 latency under 20 ms across regions", "exactly-once processing", "no data loss if a whole region "
               "fails", "strict serializability", "GDPR data residency per country", "zero-downtime schema migrations",
               "a budget of 40 commodity servers", "multi-tenant isolation", "audit logs that cannot be tampered with",
               "1 million writes per second at peak", "graceful degradation under partial network partitions",
               "rolling upgrades without version skew bugs"]
DESIGN_FRAMES = ["Design {system} with {c1}, {c2} and {c3}. Give the data model, the consistency protocol, failure "
                 "handling and capacity estimates, and justify every trade-off.",
                 "Propose a detailed architecture for {system}. Requirements: {c1}; {c2}; {c3}. Explain how each "
                 "requirement is met and what breaks first under load."]
HARD_CODE = [
    "Implement a lock-free multi-producer multi-consumer queue in C++ with hazard-pointer memory reclamation, and "
    "argue its linearizability.", "Write a register allocator using graph colouring with coalescing and spilling for "
    "a toy SSA IR.", "Implement a concurrent B+-tree in Rust with optimistic lock coupling.",
    "Write a garbage collector (concurrent mark-sweep with a write barrier) for a small interpreter in C.",
    "Implement the Raft consensus protocol with log compaction and membership changes in Go.",
    "Write a type checker with Hindley-Milner inference and type classes for a small functional language.",
    "Implement a persistent (immutable) red-black tree with deletion in Haskell and prove the invariants hold.",
    "Find and fix the data race in a double-checked-locking singleton in Java, explaining the memory model rules.",
    "Write an x86-64 JIT compiler for a stack-based bytecode with inline caching.",
    "Implement a SAT solver with CDCL, watched literals and non-chronological backtracking.",
    "Write a lock-free hash map with resizing in C11 atomics and explain the ABA problem and how you avoid it.",
    "Implement an LR(1) parser generator that reports conflicts with the conflicting items.",
]
HARD_WRITING = [
    "Write a Petrarchan sonnet in strict iambic pentameter about entropy, in which every line is an acrostic of the "
    "word THERMODYNAMICS, and explain the metre of each line.",
    "Write a 2,000-word short story in second person where every paragraph is a palindrome at the word level.",
    "Draft a legally rigorous software licence that is GPL-compatible, forbids use in weapons, and explain why the "
    "two goals conflict.",
    "Write a villanelle in French alexandrines on the theme of forgetting, with rich rhymes only.",
]
HARD_REASONING = [
    "Seven people sit at a round table; each either always lies or always tells the truth. Each says 'both my "
    "neighbours are liars'. How many liars can there be? Prove every possible count.",
    "A prisoner puzzle: 100 prisoners, 100 boxes, each may open 50. Derive the optimal strategy and prove its "
    "success probability is about 31%.", "Two players alternately remove 1, 3 or 4 stones; the last to move wins. "
    "Characterise all losing positions and prove it.",
    "Given a 5x5 nonogram with row clues 2,1 / 1,1 / 3 / 1,1 / 2,1 and column clues 1,1 / 2 / 1,1,1 / 2 / 1,1, "
    "solve it and prove the solution is unique.",
]


def _normalise(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _fill(rng: random.Random, template: str) -> str:
    country, capital = rng.choice(COUNTRIES)
    a, b = rng.randint(2, 99), rng.randint(1, 20)
    u1, u2 = rng.choice(UNITS)
    values = {
        "country": country, "capital": capital, "book": rng.choice(BOOKS), "painting": rng.choice(PAINTINGS),
        "element": rng.choice(ELEMENTS), "animal": rng.choice(ANIMALS), "fruit": rng.choice(FRUITS),
        "month": rng.choice(MONTHS), "adjective": rng.choice(ADJECTIVES), "acronym": rng.choice(ACRONYMS),
        "noun": rng.choice(NOUNS), "word": rng.choice(WORDS), "sentence": rng.choice(SENTENCES),
        "phrase": rng.choice(PHRASES), "language": rng.choice(LANGUAGES), "lang": rng.choice(CODE_LANGUAGES),
        "a": a, "b": b, "c": rng.choice([10, 20, 50, 80, 100, 200, 500]), "d": rng.choice([2, 4, 5, 10]),
        "p": rng.choice([10, 20, 25, 50]), "x": round(rng.uniform(1, 99), 1), "u1": u1, "u2": u2,
        "words": rng.choice(WORD_SETS),
    }
    return template.format(**values)


def _long_easy(rng: random.Random) -> str:
    names = rng.sample(NAMES, 2)
    lines = [line.format(name=names[0], name2=names[1], subject=rng.choice(LETTER_SUBJECTS),
                         day=rng.choice(DAYS), time=f"{rng.randint(9, 16)}:{rng.choice(['00', '30'])}")
             for line in FILLER if rng.random() < 0.8 or "{name" in line]
    body = "\n".join(lines)
    task = rng.choice(LONG_EASY_TASKS).format(language=rng.choice(LANGUAGES))
    return f"{task}\n\n{body}" if rng.random() < 0.5 else f"{body}\n\n{task}"


def _easy_makers(rng: random.Random) -> list[Callable[[], str]]:
    return [
        lambda: rng.choice(GREETINGS), lambda: rng.choice(SMALL_TALK),
        lambda: _fill(rng, rng.choice(FACT_QUESTIONS)), lambda: _fill(rng, rng.choice(REWRITES)),
        lambda: _fill(rng, rng.choice(TRANSLATE)), lambda: _fill(rng, rng.choice(EASY_CODE)),
        lambda: _fill(rng, rng.choice(MATH)), lambda: _fill(rng, rng.choice(FORMATTING)),
        lambda: _long_easy(rng),
    ]


def _hard_makers(rng: random.Random) -> list[Callable[[], str]]:
    return [
        lambda: rng.choice(PROOF_FRAMES).format(p=rng.choice(HARD_PROOFS)), lambda: rng.choice(HARD_MATH),
        lambda: rng.choice(DESIGN_FRAMES).format(system=rng.choice(SYSTEMS),
                                                 **dict(zip(("c1", "c2", "c3"), rng.sample(CONSTRAINTS, 3),
                                                            strict=True))),
        lambda: rng.choice(HARD_CODE), lambda: rng.choice(HARD_WRITING), lambda: rng.choice(HARD_REASONING),
    ]


def _distinct(makers: Sequence[Callable[[], str]], per_maker: int, rng: random.Random, excluded: set[str],
              seen: set[str]) -> list[str]:
    """Up to `per_maker` new prompts from each maker (fewer where its templates run out), in random casing."""
    out = []
    for make in makers:
        made = 0
        for _ in range(per_maker * 20):
            if made == per_maker:
                break
            text = make()
            text = text if rng.random() < 0.7 else text.lower()
            key = _normalise(text)
            if key and key not in seen and key not in excluded:
                seen.add(key)
                out.append(text)
                made += 1
    return out


def anchor_rows(tier_names: Sequence[str], per_kind: int = 150, seed: int = 0,
                exclude: Iterable[str] = ()) -> list[dict]:
    """Anchor prompts as tier-labeled rows: up to `per_kind` distinct prompts of each easy kind (cheapest
    tier) and each hard kind (top tier). Prompts equal to any of `exclude` after normalisation (the probe
    suite) are dropped."""
    rng = random.Random(seed)
    excluded = {_normalise(text) for text in exclude}
    seen: set[str] = set()
    rows: list[dict] = []
    for difficulty, makers, tier in (("easy", _easy_makers(rng), tier_names[0]),
                                     ("hard", _hard_makers(rng), tier_names[-1])):
        for text in _distinct(makers, per_kind, rng, excluded, seen):
            rows.append({"prompt": text, "tier": tier, "source": ANCHOR_SOURCE, "category": difficulty,
                         "prompt_id": f"{ANCHOR_SOURCE}:{len(rows)}"})
    return rows
