"""Anchor prompts: a generated prior for the two ends of difficulty that routing logs leave empty.

Benchmark logs hold questions, not conversation: no greeting, no "thanks!", no one-line fact any
model knows, no "fix the typo in this sentence", and few requests as hard as a research proof or
a system design with a page of constraints. A model trained on them alone has never seen either
end and places them by accident (a greeting can land on the top tier). Anchors are prompts of
*obvious* difficulty, generated here from templates and word lists, each trained towards assumed
outcomes (`assumed_outcomes`: every tier answers an easy one; a hard one defeats the cheapest tier and
is a coin flip for the top one). Their outcomes are assumed, not measured, so they are kept apart:
their own source name, never in any evaluation, listed in the model card. They share no text with
the probe suite (checked when they are built: any anchor equal to a probe after normalisation is
dropped).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from training.anchors_native import NATIVE_EASY_MORE, NATIVE_HARD_KINDS, native_values

ANCHOR_SOURCE = "anchors"
# The prompt ids of chat openers (training/chat_anchors.py) among the anchors start with this.
CHAT_ANCHOR_PREFIX = f"{ANCHOR_SOURCE}:chat:"

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
# Short everyday writing: "write" alone is no sign of difficulty; the constraints of the hard kinds are.
EASY_WRITING = [
    "Write a one-line {occasion} message for {name}.", "Write a short thank-you note to {name} for the {gift}.",
    "Draft a quick text telling {name} I'm running ten minutes late.",
    "Write a two-sentence reminder that {event} is on {day}.", "Suggest a title for a blog post about {topic}.",
    "Write a caption for a photo of my {animal}.", "write a short {occasion} card message for my {recipient}",
    "Write a polite one-line reply saying I can't make it on {day}.",
    "Can you write a short note to {name} asking to borrow the {borrowable}?",
]
OCCASIONS = ["birthday", "farewell", "congratulations", "get-well", "thank-you", "welcome", "good-luck"]
GIFTS = ["flowers", "book", "cake", "birthday card", "lift to the station", "help with the move"]
BORROWABLES = ["ladder", "umbrella", "book", "drill", "camping tent", "bike pump"]
RECIPIENTS = ["mum", "dad", "sister", "grandma", "uncle", "cousin", "neighbour", "coworker"]
EVENTS = ["the team lunch", "the project kickoff", "the school trip", "the birthday party", "the quarterly review"]
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

MULTILINGUAL_EASY = [
    "Quelle est la capitale de {country_fr} ?", "Combien font {a} et {b} ?",
    "Comment dit-on « {word_en} » en anglais ?",
    "C'est quoi un {noun_fr} ?", "Quel jour sommes-nous après lundi ?", "Donne-moi un synonyme de « content ».",
    "Was ist die Hauptstadt von {country_de}?", "Wie viel ist {a} plus {b}?", "Was bedeutet das Wort „{word_de}“?",
    "Wie spät ist es in Berlin, wenn es in London 10 Uhr ist?", "Nenne mir drei Farben.",
    "¿Cuál es la capital de {country_es}?", "¿Cuánto es {a} más {b}?", "¿Cómo se dice «{word_en}» en inglés?",
    "Dime tres frutas.", "¿Qué día va después del martes?", "Qual è la capitale della {country_it}?",
    "Quanto fa {a} per {b}?", "Come si dice «grazie» in inglese?", "Qual é a capital do {country_pt}?",
    "Quanto é {a} mais {b}?", "Como se diz «obrigado» em inglês?", "Какая столица у Франции?",
    "Сколько будет {a} плюс {b}?",
    "Как сказать «спасибо» по-английски?", "法国的首都是哪里？", "{a}加{b}等于多少？", "“谢谢”用英语怎么说？",
    "日本の首都はどこですか？", "{a}たす{b}はいくつですか？", "「ありがとう」は英語で何と言いますか？",
]
COUNTRIES_FR = ["l'Espagne", "l'Italie", "l'Allemagne", "la Belgique", "la Suisse", "le Portugal", "la Grèce"]
COUNTRIES_DE = ["Frankreich", "Italien", "Spanien", "Österreich", "Polen", "Schweden", "Norwegen"]
COUNTRIES_ES = ["Francia", "Italia", "Alemania", "Portugal", "Perú", "Chile", "Argentina"]
COUNTRIES_IT = ["Francia", "Spagna", "Germania", "Grecia", "Svezia"]
COUNTRIES_PT = ["Brasil", "Japão", "Canadá", "México", "Chile"]
NOUNS_FR = ["chat", "vélo", "parapluie", "frigo", "stylo"]
WORDS_DE = ["Fenster", "Hund", "Apfel", "Schule", "Zug"]
WORDS_EN = ["window", "apple", "dog", "school", "train", "book", "house"]
DEFINITIONS = ["What is a {noun}?", "define {word2}", "What does '{word2}' mean?", "Give me a synonym for {adjective}.",
               "What's another word for {adjective}?", "Use '{word2}' in a sentence.", "Is '{word2}' a noun or a verb?"]
WORDS2 = ["happy", "brave", "library", "whisper", "quickly", "ocean", "garden", "friendly", "borrow", "ancient"]
HOW_TO = ["how do I boil an egg?", "how long should I cook pasta?", "How do I take a screenshot on Windows?",
          "how to make a cup of tea", "How do I reset my router?", "how do I tie my shoes?",
          "How do I copy and paste on a Mac?", "What's a good way to remember someone's name?",
          "how often should I water a cactus?", "How do I zip a folder?",
          "how do I turn off my phone's flashlight?", "How can I fall asleep faster?", "how many cups are in a litre?"]
LISTINGS = [
    ("Product: {brand} Desk Lamp\nColour: {colour}\nPower: 40 W\nHeight: 45 cm\nWarranty: 2 years\nIn the box: lamp, "
     "bulb, manual", ["What colour is the lamp?", "How tall is it?", "How long is the warranty?"]),
    ("Recipe: {brand} pancakes\nServes 4\n- 2 eggs\n- 250 ml milk\n- 200 g flour\n- a pinch of salt\n- butter for "
     "the pan\nWhisk everything, rest 10 minutes, fry on medium heat.", ["How many eggs do I need?",
     "How many people does this serve?", "How long should the batter rest?"]),
    ("Receipt - {brand} Market\nBread 2.50\nMilk 1.20\nApples 3.10\nCoffee 6.80\nTotal 13.60\nPaid by card",
     ["What was the total?", "How much was the coffee?", "How did I pay?"]),
    ('{{"service": "{brand_lower}-api", "port": 8080, "debug": false, "workers": 4, "region": "eu-west-1"}}',
     ["What port does this use?", "Is debug on?", "How many workers are configured?"]),
    ("Review: I bought the {brand} kettle last month. It boils fast, looks {colour_adj} on the counter and the handle "
     "stays cool. The lid is a bit stiff but overall I'm very happy with it and would buy it again.",
     ["Is this review positive or negative?", "What does the reviewer dislike?", "Give this review a star rating."]),
    ("def greet(name):\n    message = 'Hello, ' + name\n    print(message)\n\ngreet('{name}')",
     ["Add a comment at the top of this code.", "Rename the variable message to text.", "What does this code print?"]),
    ("<html>\n<head><title>Home</title></head>\n<body>\n<h1>Welcome</h1>\n<p>We are open every day from 9 to 5.</p>\n"
     "</body>\n</html>", ["Change the title to \"{brand}\".", "What are the opening hours on this page?",
                            "Make the heading say Hello instead of Welcome."]),
    ("Meeting notes ({day}):\n- {name} will send the slides by Friday\n- Budget review moved to next week\n- {name2} "
     "to book the room for the workshop\n- Everyone: fill in the survey", ["List the action items.",
     "Who is sending the slides?", "Summarise these notes in one sentence."]),
]
BRANDS = ["Nordic", "Acme", "Sunny", "Bluebird", "Maple", "Orchid", "Harbor", "Pinewood"]
COLOURS = ["matte black", "white", "sage green", "red", "silver"]

PROOF_FRAMES_OTHER = ["Докажите, что {p}.", "Beweisen Sie, dass {p}.", "Démontrez que {p}.", "Demuestra que {p}.",
                      "Dimostra che {p}.", "证明：{p}。", "次を証明せよ：{p}。"]
CONSTRAINED_WRITING = [
    "Write a {n}-line poem about {topic} in which every line starts with the next letter of the alphabet and no "
    "word is repeated, then prove no word repeats by listing them all.",
    "Write a story of exactly {n} words about {topic} without using the letter '{letter}', and give the word count "
    "of every sentence.", "Compose a sestina about {topic} with the six end-words rotating in the strict traditional "
    "order, and mark the pattern in each stanza.", "Write a sonnet about {topic} in strict iambic pentameter with an "
    "ABAB CDCD EFEF GG rhyme scheme and scan every line.",
    "Translate a classic sonnet about {topic} into {language}, keeping the metre, the rhyme scheme and every image.",
]
TOPICS = ["the sea", "insomnia", "a broken clock", "migration", "the first snow", "an empty station", "inflation"]
HARD_ANALYSIS = [
    "Compare the doctrine of {doctrine} in German and English contract law, citing the leading cases and explaining "
    "how each would decide a case where {facts}.", "A {age}-year-old presents with {symptoms}. Give a ranked "
    "differential diagnosis with the findings that separate each, the next tests, and how each result changes "
    "management.", "Derive the {quantity} of {system_phys} from first principles, state every approximation and "
    "estimate the error each introduces.",
]
DOCTRINES = ["frustration of purpose", "culpa in contrahendo", "anticipatory breach", "good faith in negotiations"]
FACTS = ["the buyer learns of a defect after paying but before delivery", "a supplier goes bankrupt mid-contract"]
SYMPTOMS = ["fever, a new heart murmur and splinter haemorrhages", "progressive weakness, ptosis worse in the "
            "evening and a thymic mass", "polyuria, weight loss and a normal fasting glucose"]
QUANTITIES = ["partition function", "dispersion relation", "critical exponent", "ground-state energy"]
SYSTEMS_PHYS = ["a 2D Ising model on a square lattice", "phonons in a 1D diatomic chain",
                "a particle in a finite square well", "a rotating relativistic string"]
HARD_CODE_FRAMES = [
    "Write a {thing} in {lang} that is safe under concurrent use, with no locks on the read path, and explain why "
    "it is linearizable.", "Optimise this {thing} in {lang} to handle 10 million operations per second on one core; "
    "show the profiling evidence for each change.", "Implement {algorithm} in {lang} with the best known asymptotic "
    "complexity, prove the bound, and handle every edge case.",
]
THINGS = ["LRU cache", "skip list", "work-stealing deque", "ring buffer", "trie with deletion", "interval tree"]
# Short requests whose whole difficulty is a constraint or a trick: length must not read as ease.
SHORT_HARD = [
    "Write a {form} about {topic} that reads the same backwards, letter by letter.",
    "Write a limerick about {topic} in which every word starts with the letter {upper}.",
    "Write a sentence about {topic} in which each word is one letter longer than the one before.",
    "Write a {form} about {topic} that never uses the letter e.",
    "Write a {lang} quine whose source code is also a palindrome.",
    "Write a {lang} program that prints its own source code reversed.",
    "Write one program that is valid {polyglot} and prints the same thing in both.",
    "Find every six-letter English word whose letters are in alphabetical order, and prove the list is complete.",
    "Translate {poem_translation} as verse, keeping its metre and rhyme scheme.",
]
FORMS = ["sentence", "couplet", "limerick", "haiku", "tweet", "two-line poem"]
POLYGLOTS = ["Python and valid Ruby", "C and valid Python", "Perl and valid Python", "JavaScript and valid Python",
             "Ruby and valid Perl", "C and valid Haskell"]
POEM_TRANSLATIONS = ["Goethe's 'Erlkönig' into English", "Baudelaire's 'L'Albatros' into German",
                     "Pushkin's 'I loved you' into French", "Lorca's 'Romance sonámbulo' into English",
                     "Leopardi's 'L'infinito' into Spanish", "a Heine ballad into Italian"]
ALGORITHMS = ["suffix array construction (SA-IS)", "min-cost max-flow", "Edmonds' blossom matching",
              "Aho-Corasick with failure links", "a persistent segment tree", "Dinic's algorithm"]


# The outcomes anchors stand for, per tier from cheapest to top. Any model answers an easy anchor; a hard
# one defeats a small model and is far from certain for the top tier: a hard target of 1 for the top
# tier would teach that tier's head that everything hard is solved, and lift its score on every prompt.
EASY_OUTCOME = 1.0
HARD_OUTCOMES = (0.05, 0.6)  # cheapest tier, top tier; tiers between are interpolated


def assumed_outcomes(difficulty: str, n_tiers: int) -> list[float]:
    """The per-tier outcomes an anchor of `difficulty` ('easy' or 'hard') is trained towards."""
    if difficulty == "easy":
        return [EASY_OUTCOME] * n_tiers
    return [float(v) for v in np.linspace(HARD_OUTCOMES[0], HARD_OUTCOMES[1], n_tiers)]

# Hard requests written natively in other languages (a proof, a verse translation keeping metre and rhyme,
# an expert legal or medical comparison), and easy ones beside them: the model reads other scripts
# through rare word pieces, and would otherwise find every such prompt equally unremarkable.
NATIVE_HARD = [
    "Докажите, что {ru_statement}.", "Приведите строгое доказательство того, что {ru_statement}.",
    "Beweisen Sie vollständig, dass {de_statement}.", "Zeige rigoros: {de_statement}.",
    "Démontrez rigoureusement que {fr_statement}.", "Prouvez en détail que {fr_statement}.",
    "Demuestra de forma rigurosa que {es_statement}.", "Dimostra in modo rigoroso che {it_statement}.",
    "请严格证明：{zh_statement}。", "次のことを厳密に証明せよ：{ja_statement}。",
    "Переведите стихотворение «{ru_poem}» на {ru_language} язык, сохранив размер и рифму, и объясните выбор.",
    "Übersetze das Gedicht „{de_poem}“ ins {de_language}e und bewahre dabei Versmaß und Reimschema.",
    "Traduisez le poème « {fr_poem} » en {fr_language} en conservant le mètre et les rimes, vers par vers.",
    "Сравните {ru_legal} в праве России и Германии со ссылками на судебную практику и статьи кодексов.",
    "Vergleichen Sie {de_legal} im deutschen und französischen Recht anhand der Rechtsprechung.",
    "Analysez en détail {fr_legal} en droit français et allemand, avec la jurisprudence pertinente.",
    "请比较中美两国法律中关于{zh_legal}的规定，并引用相关判例加以分析。",
    "{ja_legal}について、日本法とドイツ法の違いを判例を挙げて詳しく論じてください。",
]
RU_STATEMENTS = ["группа порядка p^2 абелева", "множество простых чисел бесконечно", "число e иррационально",
                 "всякая непрерывная функция на отрезке равномерно непрерывна", "ряд обратных простых расходится"]
DE_STATEMENTS = ["jede endliche Integritätsbereich ein Körper ist", "die Cantor-Menge überabzählbar ist",
                 "pi irrational ist", "jeder kompakte Hausdorffraum normal ist", "das Halteproblem unentscheidbar ist"]
FR_STATEMENTS = ["tout groupe d'ordre p^2 est abélien", "la série des inverses des nombres premiers diverge",
                 "e est transcendant", "tout espace vectoriel admet une base",
                 "l'ensemble de Cantor est de mesure nulle"]
ES_STATEMENTS = ["hay infinitos primos de la forma 4k+3", "todo dominio de integridad finito es un cuerpo",
                 "la raíz cuadrada de 2 es irracional y la de 3 también, sin usar la factorización única"]
IT_STATEMENTS = ["ogni gruppo di ordine p^2 è abeliano", "il problema della fermata è indecidibile",
                 "ogni successione monotona limitata converge"]
ZH_STATEMENTS = ["素数有无穷多个", "每个有限整环都是域", "圆周率是无理数", "有界单调数列必收敛"]
JA_STATEMENTS = ["素数は無限に存在する", "有限整域は体である", "円周率は無理数である", "有界な単調数列は収束する"]
RU_POEMS = ["Я помню чудное мгновенье", "Белеет парус одинокий", "Зимнее утро"]
DE_POEMS = ["Erlkönig", "Der Panther", "Mondnacht"]
FR_POEMS = ["Le Pont Mirabeau", "Demain, dès l'aube", "L'Albatros"]
RU_LANGUAGES = ["английский", "немецкий", "французский"]
DE_LANGUAGES = ["Englisch", "Spanisch", "Italienisch"]
FR_LANGUAGES = ["anglais", "allemand", "espagnol"]
RU_LEGAL = ["институт добросовестного приобретения", "ответственность директора за убытки"]
DE_LEGAL = ["die Haftung des Geschäftsführers in der Insolvenz", "den gutgläubigen Erwerb beweglicher Sachen"]
FR_LEGAL = ["la responsabilité du fait des produits défectueux", "l'imprévision dans les contrats commerciaux"]
ZH_LEGAL = ["公司董事的忠实义务", "善意取得制度"]
JA_LEGAL = ["取締役の善管注意義務と経営判断原則", "契約不適合責任における追完請求"]
NATIVE_EASY = [
    "Trie ces mots par ordre alphabétique : {fr_words}", "Ordena estas palabras alfabéticamente: {es_words}",
    "Sortiere diese Wörter alphabetisch: {de_words}", "Расставь слова по алфавиту: {ru_words}",
    "Traduis en anglais : « {fr_phrase} »", "Übersetze ins Englische: „{de_phrase}“",
    "Traduce al inglés: «{es_phrase}»", "Переведи на английский: «{ru_phrase}»", "把这句话翻译成英文：{zh_phrase}",
    "この文を英語に訳してください：{ja_phrase}", "Corrige l'orthographe : « {fr_typo} »",
    "Korrigiere die Rechtschreibung: „{de_typo}“", "Corrige la ortografía: «{es_typo}»",
]
FR_WORDS = ["zèbre, chat, lion, âne", "pomme, banane, cerise", "rouge, bleu, vert, jaune"]
ES_WORDS = ["perro, gato, ratón", "mesa, silla, lámpara", "uva, pera, manzana"]
DE_WORDS = ["Hund, Katze, Maus", "Tisch, Stuhl, Lampe", "Apfel, Birne, Traube"]
RU_WORDS = ["кошка, собака, мышь", "стол, стул, лампа", "яблоко, груша, слива"]
FR_PHRASES = ["Je suis en retard, désolé.", "Le magasin ferme à 18 heures.", "Merci pour ton aide hier."]
DE_PHRASES = ["Ich komme morgen später.", "Das Essen war sehr lecker.", "Wo ist der Bahnhof?"]
ES_PHRASES = ["Llego tarde, lo siento.", "La tienda cierra a las seis.", "Gracias por tu ayuda."]
RU_PHRASES = ["Я опаздываю, извини.", "Магазин закрывается в шесть.", "Спасибо за помощь."]
ZH_PHRASES = ["我明天会晚一点到。", "这家餐厅很好吃。", "谢谢你的帮助。"]
JA_PHRASES = ["明日は少し遅れます。", "この店は六時に閉まります。", "手伝ってくれてありがとう。"]
FR_TYPOS = ["je suis aller au marcher hier", "il fait beaux aujourdhui"]
DE_TYPOS = ["ich habe keine zeit heute abend", "das wetter ist schon"]
ES_TYPOS = ["mañana boy a la playa", "estoi muy cansado oy"]
EASY_CODE_MORE = [
    "Give me SQL that returns every column of the {table} table.", "SQL to count the rows in {table}?",
    "How do I rename a file in the terminal?", "What does `ls -la` do?", "How do I undo my last git commit?",
    "Write a CSS rule that makes all paragraphs blue.", "How do I center a div?",
    "Write a regular expression that matches a five-digit number.", "How do I install a Python package with pip?",
]
TABLES = ["users", "orders", "products", "customers", "employees"]

# Everyday messages written in other languages, each with a simple ask in the same language (translate
# it, find the date, shorten it): length and an unfamiliar script alone must not read as difficulty.
NATIVE_MESSAGES = {
    "fr": (["Salut {name} !", "J'espère que tu vas bien et que le week-end s'est bien passé.",
            "On se retrouve {day_fr} à {time} devant la boulangerie, comme d'habitude.",
            "N'oublie pas d'apporter les gâteaux, les enfants les attendent avec impatience.",
            "Si tu es en retard, envoie-moi juste un petit message.",
            "Merci encore pour ton aide avec le déménagement.",
            "Le parking est gratuit après 18 heures.", "À bientôt et bises,", "{name2}"],
           ["Tu peux me traduire ce message en anglais ?", "C'est quand, le rendez-vous ? Je ne retrouve plus l'info.",
            "Résume ce message en une phrase, s'il te plaît.", "Rends ce message un peu plus poli.",
            "Qui a écrit ce message ?"]),
    "de": (["Hallo {name},", "ich hoffe, es geht dir gut und du hattest ein schönes Wochenende.",
            "Wir treffen uns am {day_de} um {time} vor dem Rathaus.", "Bitte bring die Unterlagen vom letzten Mal mit.",
            "Falls du es nicht schaffst, sag einfach kurz Bescheid.", "Danke nochmal für deine Hilfe beim Umzug!",
            "Parken ist nach 18 Uhr kostenlos.", "Viele Grüße", "{name2}"],
           ["Kannst du mir diese Nachricht ins Englische übersetzen?", "Wann ist das Treffen genau?",
            "Fasse die Nachricht bitte in einem Satz zusammen.", "Mach die Nachricht etwas höflicher.",
            "Wer hat diese Nachricht geschrieben?"]),
    "es": (["¡Hola, {name}!", "Espero que estés bien y que hayas tenido un buen fin de semana.",
            "Quedamos el {day_es} a las {time} en la plaza, como siempre.",
            "No te olvides de traer las fotos del viaje.",
            "Si llegas tarde, mándame un mensaje.", "Gracias otra vez por ayudarme con la mudanza.",
            "El aparcamiento es gratis después de las seis.", "Un abrazo,", "{name2}"],
           ["¿Me traduces este mensaje al inglés?", "¿Cuándo es la cita? No encuentro la fecha.",
            "Resume este mensaje en una frase, por favor.", "Haz este mensaje un poco más educado.",
            "¿Quién escribió este mensaje?"]),
    "it": (["Ciao {name}!", "Spero che tu stia bene e che il weekend sia andato bene.",
            "Ci vediamo {day_it} alle {time} davanti al bar, come sempre.",
            "Non dimenticare di portare le foto della gita.",
            "Se fai tardi, mandami un messaggio.", "Grazie ancora per l'aiuto con il trasloco.",
            "Il parcheggio è gratuito dopo le sei.", "Un abbraccio,", "{name2}"],
           ["Puoi tradurre in inglese quello che mi ha scritto?", "Quando ci vediamo esattamente?",
            "Riassumi questo messaggio in una frase, per favore.", "Rendi questo messaggio un po' più gentile.",
            "Chi ha scritto questo messaggio?"]),
    "pt": (["Oi, {name}!", "Espero que você esteja bem e que o fim de semana tenha sido bom.",
            "A gente se encontra na {day_pt} às {time} na frente da padaria.",
            "Não esqueça de trazer as fotos da viagem.",
            "Se atrasar, me manda uma mensagem.", "Obrigado de novo pela ajuda com a mudança.",
            "O estacionamento é grátis depois das seis.", "Um abraço,", "{name2}"],
           ["Pode traduzir esta mensagem para o inglês?", "Quando é o encontro? Não acho a data.",
            "Resuma esta mensagem em uma frase, por favor.", "Deixe esta mensagem um pouco mais educada.",
            "Quem escreveu esta mensagem?"]),
}
NATIVE_DAYS = {"fr": ["lundi", "mardi", "jeudi", "samedi"], "de": ["Montag", "Dienstag", "Donnerstag", "Samstag"],
               "es": ["lunes", "martes", "jueves", "sábado"], "it": ["lunedì", "martedì", "giovedì", "sabato"],
               "pt": ["segunda", "terça", "quinta", "sexta"]}


def normalise_prompt(text: str) -> str:
    """`text` lowercased, with every run of non-word characters one space: how prompts are compared."""
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
        "words": rng.choice(WORD_SETS), "country_fr": rng.choice(COUNTRIES_FR), "country_de": rng.choice(COUNTRIES_DE),
        "country_es": rng.choice(COUNTRIES_ES), "country_it": rng.choice(COUNTRIES_IT),
        "country_pt": rng.choice(COUNTRIES_PT), "noun_fr": rng.choice(NOUNS_FR), "word_de": rng.choice(WORDS_DE),
        "word_en": rng.choice(WORDS_EN), "word2": rng.choice(WORDS2), "n": rng.choice([12, 14, 26, 40, 100]),
        "topic": rng.choice(TOPICS), "letter": rng.choice("eaio"), "doctrine": rng.choice(DOCTRINES),
        "facts": rng.choice(FACTS), "age": rng.randint(19, 80), "symptoms": rng.choice(SYMPTOMS),
        "quantity": rng.choice(QUANTITIES), "system_phys": rng.choice(SYSTEMS_PHYS), "thing": rng.choice(THINGS),
        "algorithm": rng.choice(ALGORITHMS), "ru_statement": rng.choice(RU_STATEMENTS),
        "de_statement": rng.choice(DE_STATEMENTS), "fr_statement": rng.choice(FR_STATEMENTS),
        "es_statement": rng.choice(ES_STATEMENTS), "it_statement": rng.choice(IT_STATEMENTS),
        "zh_statement": rng.choice(ZH_STATEMENTS), "ja_statement": rng.choice(JA_STATEMENTS),
        "ru_poem": rng.choice(RU_POEMS), "de_poem": rng.choice(DE_POEMS), "fr_poem": rng.choice(FR_POEMS),
        "ru_language": rng.choice(RU_LANGUAGES), "de_language": rng.choice(DE_LANGUAGES),
        "fr_language": rng.choice(FR_LANGUAGES), "ru_legal": rng.choice(RU_LEGAL), "de_legal": rng.choice(DE_LEGAL),
        "fr_legal": rng.choice(FR_LEGAL), "zh_legal": rng.choice(ZH_LEGAL), "ja_legal": rng.choice(JA_LEGAL),
        "fr_words": rng.choice(FR_WORDS), "es_words": rng.choice(ES_WORDS), "de_words": rng.choice(DE_WORDS),
        "ru_words": rng.choice(RU_WORDS), "fr_phrase": rng.choice(FR_PHRASES), "de_phrase": rng.choice(DE_PHRASES),
        "es_phrase": rng.choice(ES_PHRASES), "ru_phrase": rng.choice(RU_PHRASES), "zh_phrase": rng.choice(ZH_PHRASES),
        "ja_phrase": rng.choice(JA_PHRASES), "fr_typo": rng.choice(FR_TYPOS), "de_typo": rng.choice(DE_TYPOS),
        "es_typo": rng.choice(ES_TYPOS), "table": rng.choice(TABLES), "form": rng.choice(FORMS),
        "upper": rng.choice("BCDFGLMPST"), "polyglot": rng.choice(POLYGLOTS),
        "poem_translation": rng.choice(POEM_TRANSLATIONS), "occasion": rng.choice(OCCASIONS),
        "gift": rng.choice(GIFTS), "borrowable": rng.choice(BORROWABLES), "recipient": rng.choice(RECIPIENTS),
        "name": rng.choice(NAMES), "day": rng.choice(DAYS), "event": rng.choice(EVENTS),
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


def _native_long_easy(rng: random.Random) -> str:
    language = rng.choice(sorted(NATIVE_MESSAGES))
    lines, tasks = NATIVE_MESSAGES[language]
    names = rng.sample(NAMES, 2)
    day = rng.choice(NATIVE_DAYS[language])
    values = {"name": names[0], "name2": names[1], "time": f"{rng.randint(9, 19)}:{rng.choice(['00', '30'])}",
              f"day_{language}": day}
    body = "\n".join(line.format(**values) for line in lines if rng.random() < 0.8 or "{name" in line)
    task = rng.choice(tasks)
    return f"{task}\n\n{body}" if rng.random() < 0.5 else f"{body}\n\n{task}"


def _listing_question(rng: random.Random) -> str:
    template, questions = rng.choice(LISTINGS)
    brand = rng.choice(BRANDS)
    names = rng.sample(NAMES, 2)
    text = template.format(brand=brand, brand_lower=brand.lower(), colour=rng.choice(COLOURS),
                           colour_adj=rng.choice(["nice", "great", "modern", "cheap"]), name=names[0],
                           name2=names[1], day=rng.choice(DAYS))
    question = rng.choice(questions).format(brand=brand)
    return f"{question}\n\n{text}" if rng.random() < 0.5 else f"{text}\n\n{question}"


def _native_kind(rng: random.Random) -> str:
    """A hard request of any kind, in a language drawn uniformly, so that no language reads as easy."""
    template = rng.choice(NATIVE_HARD_KINDS[rng.choice(sorted(NATIVE_HARD_KINDS))])
    return template.format(**native_values(rng))


def _native_easy(rng: random.Random) -> str:
    return rng.choice(NATIVE_EASY_MORE).format(**native_values(rng))


def _easy_makers(rng: random.Random) -> list[Callable[[], str]]:
    return [
        lambda: rng.choice(GREETINGS), lambda: rng.choice(SMALL_TALK),
        lambda: _fill(rng, rng.choice(FACT_QUESTIONS)), lambda: _fill(rng, rng.choice(REWRITES)),
        lambda: _fill(rng, rng.choice(TRANSLATE)), lambda: _fill(rng, rng.choice(EASY_CODE)),
        lambda: _fill(rng, rng.choice(MATH)), lambda: _fill(rng, rng.choice(FORMATTING)),
        lambda: _long_easy(rng), lambda: _fill(rng, rng.choice(MULTILINGUAL_EASY)),
        lambda: _fill(rng, rng.choice(DEFINITIONS)), lambda: rng.choice(HOW_TO), lambda: _listing_question(rng),
        lambda: _fill(rng, rng.choice(NATIVE_EASY)), lambda: _fill(rng, rng.choice(EASY_CODE_MORE)),
        lambda: _native_long_easy(rng), lambda: _native_easy(rng), lambda: _fill(rng, rng.choice(EASY_WRITING)),
    ]


def _hard_makers(rng: random.Random) -> list[Callable[[], str]]:
    return [
        lambda: rng.choice(PROOF_FRAMES).format(p=rng.choice(HARD_PROOFS)), lambda: rng.choice(HARD_MATH),
        lambda: rng.choice(DESIGN_FRAMES).format(system=rng.choice(SYSTEMS),
                                                 **dict(zip(("c1", "c2", "c3"), rng.sample(CONSTRAINTS, 3),
                                                            strict=True))),
        lambda: rng.choice(HARD_CODE), lambda: rng.choice(HARD_WRITING), lambda: rng.choice(HARD_REASONING),
        lambda: rng.choice(PROOF_FRAMES_OTHER).format(p=rng.choice(HARD_PROOFS)),
        lambda: _fill(rng, rng.choice(CONSTRAINED_WRITING)), lambda: _fill(rng, rng.choice(HARD_ANALYSIS)),
        lambda: _fill(rng, rng.choice(HARD_CODE_FRAMES)), lambda: _fill(rng, rng.choice(NATIVE_HARD)),
        lambda: _fill(rng, rng.choice(SHORT_HARD)),
        lambda: _fill(rng, rng.choice(NATIVE_HARD)), lambda: _native_kind(rng), lambda: _native_kind(rng),
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
            key = normalise_prompt(text)
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
    excluded = {normalise_prompt(text) for text in exclude}
    seen: set[str] = set()
    rows: list[dict] = []
    for difficulty, makers, tier in (("easy", _easy_makers(rng), tier_names[0]),
                                     ("hard", _hard_makers(rng), tier_names[-1])):
        for text in _distinct(makers, per_kind, rng, excluded, seen):
            rows.append({"prompt": text, "tier": tier, "source": ANCHOR_SOURCE, "category": difficulty,
                         "prompt_id": f"{ANCHOR_SOURCE}:{len(rows)}"})
    return rows
