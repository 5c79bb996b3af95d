"""Seeded synthetic stand-ins for the paper's four FLAN tasks: qqp, webnlg, samsum, gigaword.

Why synthetic: the experiments run with tiny LMs pretrained from scratch, offline. The tasks
mirror the paper's FLAN subset in *shape* (paraphrase detection with a Yes/No answer,
triples-to-text, dialogue summarisation, sentence-to-headline) over one shared "world" of people,
cities, organisations, objects, jobs, foods and activities, so that

* every output is a deterministic, learnable function of the input (the canonical realisation of
  the slots found in the input), so LoRA fine-tuning clearly raises ROUGE-1;
* outputs share words with inputs (ROUGE-1 is word overlap);
* the four tasks' *inputs* look clearly different ("Question 1: ... Question 2: ...",
  "S | relation | O ; ...", a multi-line "Name: ..." dialogue, one long news sentence) while
  sharing the world's vocabulary, so K-Means on mean-pooled LM embeddings separates tasks;
* texts are short: prompt + output is typically <= ~120 tokens with a ~4k byte-level BPE.

Each example is a dict ``{"task", "instruction", "input", "output"}``; ``instruction`` is drawn
from >= 4 templates per task. Surface variety in the inputs (several templates per sentence or
dialogue turn, filler turns, question phrasings) does not change the output.

Combinatorial size (lower bounds on distinct *inputs*, ignoring instruction templates; the world
sizes are 60 first names x 40 surnames = 2400 full names, 40 cities, 30 organisations, 20 jobs,
25 objects, 20 activities, 14 foods, 15 places, 7 days, 12 times):

* qqp: the "buy" frame alone has 9 adjectives x 25 objects x 40 cities = 9000 contents, each
  with 4 x 3 ordered template pairs -> > 100k Yes inputs; No pairs combine any two of the
  > 200k contents over 8 frames -> >> 1e9.
* webnlg: a single "person | birth place | city" triple already gives 2400 x 40 = 96k inputs;
  with 12 relations and 1-4 chained triples the count is >> 1e9.
* samsum: the "meet" frame alone has 60 x 59 speakers x 15 places x 7 days x 12 times x
  (turn variants) > 4e7.
* gigaword: the "acquisition" frame alone has 30 x 29 organisations x 7 days x 99 amounts x
  40 cities x 3 phrasings > 7e7.

Determinism: ``random.Random`` seeded with the string ``"fedrouter:{task}:{seed}"`` (string
seeds are hashed with SHA-512 by Python, stable across runs and platforms). Same (task, seed) ->
identical examples; different seeds -> different streams.
"""

from __future__ import annotations

import random
from typing import Callable

TASKS = ("qqp", "gigaword", "samsum", "webnlg")  # the authors' order (split_dataset.py)

# --------------------------------------------------------------------------------------- world
FIRST_NAMES = (
    "Anna", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Hugo", "Irene", "Jack",
    "Karen", "Leo", "Maria", "Nina", "Oscar", "Paula", "Quentin", "Rosa", "Sam", "Tina",
    "Umar", "Vera", "Walter", "Xavier", "Yusuf", "Zoe", "Adam", "Bella", "Chris", "Diana",
    "Eric", "Fiona", "George", "Helen", "Ivan", "Julia", "Kevin", "Laura", "Mark", "Nora",
    "Olga", "Peter", "Rita", "Simon", "Tom", "Ursula", "Victor", "Wendy", "Alex", "Emma",
    "Lucas", "Mia", "Noah", "Sofia", "Liam", "Chloe", "Omar", "Lena", "Marco", "Ines",
)
LAST_NAMES = (
    "Silva", "Brown", "Novak", "Keller", "Rossi", "Meyer", "Costa", "Fischer", "Moreau",
    "Jensen", "Ortiz", "Weber", "Santos", "Kowalski", "Dubois", "Larsen", "Romano", "Schmidt",
    "Ferreira", "Nilsen", "Garcia", "Muller", "Bauer", "Lopez", "Martin", "Blake", "Young",
    "Hughes", "Price", "Turner", "Walsh", "Reed", "Grant", "Fox", "Lang", "Stone", "Hart",
    "Moss", "Ward", "Pike",
)
CITY_COUNTRY = (
    ("Lisbon", "Portugal"), ("Porto", "Portugal"), ("Oslo", "Norway"), ("Bergen", "Norway"),
    ("Vienna", "Austria"), ("Prague", "Czechia"), ("Dublin", "Ireland"), ("Madrid", "Spain"),
    ("Seville", "Spain"), ("Berlin", "Germany"), ("Hamburg", "Germany"), ("Warsaw", "Poland"),
    ("Krakow", "Poland"), ("Athens", "Greece"), ("Milan", "Italy"), ("Turin", "Italy"),
    ("Lyon", "France"), ("Nantes", "France"), ("Geneva", "Switzerland"), ("Ghent", "Belgium"),
    ("Malmo", "Sweden"), ("Leeds", "England"), ("Boston", "America"), ("Denver", "America"),
    ("Austin", "America"), ("Toronto", "Canada"), ("Ottawa", "Canada"), ("Nairobi", "Kenya"),
    ("Lagos", "Nigeria"), ("Cairo", "Egypt"), ("Mumbai", "India"), ("Delhi", "India"),
    ("Osaka", "Japan"), ("Kyoto", "Japan"), ("Seoul", "Korea"), ("Manila", "Philippines"),
    ("Lima", "Peru"), ("Quito", "Ecuador"), ("Santiago", "Chile"), ("Bogota", "Colombia"),
)
CITIES = tuple(c for c, _ in CITY_COUNTRY)
COUNTRY_OF = dict(CITY_COUNTRY)
COUNTRIES = tuple(sorted(set(COUNTRY_OF.values())))
ORGS = (
    "Orion Labs", "Baker Foods", "Blue River Bank", "Nova Motors", "Green Leaf Farms",
    "Atlas Airlines", "Summit Energy", "Polar Telecom", "Red Oak Books", "Silver Line Rail",
    "Harbor Shipping", "Sunrise Media", "Iron Bridge Steel", "Crystal Water", "Falcon Software",
    "Maple Health", "Golden Gate Hotels", "North Star Insurance", "Swift Logistics",
    "Bright Path Schools", "Copper Hill Mining", "Pine Valley Dairy", "Echo Games",
    "Lighthouse Films", "Stone Arch Builders", "Quick Cart Stores", "Velvet Fashion",
    "Cloud Nine Travel", "Riverside Hospital", "Sparrow Robotics",
)
INDUSTRY_OF = {
    "Orion Labs": "research", "Baker Foods": "food", "Blue River Bank": "banking",
    "Nova Motors": "car", "Green Leaf Farms": "farming", "Atlas Airlines": "airline",
    "Summit Energy": "energy", "Polar Telecom": "telecom", "Red Oak Books": "publishing",
    "Silver Line Rail": "railway", "Harbor Shipping": "shipping", "Sunrise Media": "media",
    "Iron Bridge Steel": "steel", "Crystal Water": "water", "Falcon Software": "software",
    "Maple Health": "health", "Golden Gate Hotels": "hotel", "North Star Insurance": "insurance",
    "Swift Logistics": "logistics", "Bright Path Schools": "education",
    "Copper Hill Mining": "mining", "Pine Valley Dairy": "dairy", "Echo Games": "games",
    "Lighthouse Films": "film", "Stone Arch Builders": "building", "Quick Cart Stores": "retail",
    "Velvet Fashion": "fashion", "Cloud Nine Travel": "travel", "Riverside Hospital": "health",
    "Sparrow Robotics": "robotics",
}
JOBS = (
    "teacher", "doctor", "engineer", "nurse", "lawyer", "chef", "pilot", "architect",
    "journalist", "painter", "farmer", "banker", "designer", "musician", "scientist", "writer",
    "dentist", "plumber", "photographer", "librarian",
)
OBJECTS = (
    "bicycle", "laptop", "phone", "camera", "guitar", "sofa", "car", "watch", "jacket",
    "backpack", "printer", "piano", "tent", "lamp", "desk", "tablet", "scooter", "kettle",
    "microwave", "umbrella", "painting", "necklace", "helmet", "telescope", "drone",
)
OBJECT_ADJS = ("cheap", "used", "new", "good", "small", "light", "old", "quiet", "red")
ACTIVITIES = (
    "play the guitar", "cook pasta", "speak Spanish", "ride a horse", "swim", "paint with oils",
    "write code", "bake bread", "play chess", "dance salsa", "drive a truck", "fly a drone",
    "grow tomatoes", "sing", "knit", "ski", "surf", "run a marathon", "edit videos",
    "fix a bike",
)
FOODS = (
    "pizza", "sushi", "tacos", "pasta", "soup", "burgers", "salad", "curry", "noodles",
    "pancakes", "dumplings", "falafel", "paella", "ramen",
)
PLACES = (
    "cinema", "park", "library", "cafe", "gym", "museum", "beach", "station", "mall",
    "restaurant", "office", "stadium", "market", "bakery", "theatre",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TIMES = (
    "9 am", "10 am", "11 am", "noon", "1 pm", "2 pm", "3 pm", "4 pm", "5 pm", "6 pm", "7 pm",
    "8 pm",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
GOODS = ("bread", "rice", "milk", "coffee", "fuel", "rent", "meat", "fruit", "cheese", "sugar")
REASONS = ("the traffic", "the rain", "a delayed train", "a long meeting", "a flat tyre",
           "the snow", "a broken bus")
TRIP_MODS = ("with kids", "on a budget", "alone", "for a weekend", "in winter", "by train")


def a_an(word: str) -> str:
    """Indefinite article + word ("an engineer", "a used laptop")."""
    return ("an " if word[0].lower() in "aeio" else "a ") + word


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _other(rng: random.Random, pool, not_this):
    while True:
        x = rng.choice(pool)
        if x != not_this:
            return x


# ----------------------------------------------------------------------------------- qqp task
# Each frame: slot samplers and >= 3 phrasings of the same underlying question. A Yes pair is
# one content under two different phrasings; a No pair is two different contents (half the time
# the same frame with one slot changed, so the model must compare slots, not frames).
_QQP_FRAMES: dict[str, tuple[dict[str, Callable], tuple[str, ...]]] = {
    "learn": (
        {"act": lambda r: r.choice(ACTIVITIES), "city": lambda r: r.choice(CITIES),
         "who": lambda r: r.choice(("a beginner", "an adult", "a student", "a retired person",
                                    "a busy parent", "a teenager"))},
        (
            "How can {who} learn to {act} in {city}?",
            "What is the best way for {who} to learn to {act} in {city}?",
            "Where in {city} can {who} learn to {act}?",
            "I am {who} in {city}. How do I start learning to {act}?",
        ),
    ),
    "buy": (
        {"adj": lambda r: r.choice(OBJECT_ADJS), "obj": lambda r: r.choice(OBJECTS),
         "city": lambda r: r.choice(CITIES)},
        (
            "Where can I buy {a_adj} {obj} in {city}?",
            "In {city}, where is a good place to buy {a_adj} {obj}?",
            "Which shop in {city} sells {a_adj} {obj}?",
            "What is the best store to get {a_adj} {obj} in {city}?",
        ),
    ),
    "visit": (
        {"city": lambda r: r.choice(CITIES), "mod": lambda r: r.choice(TRIP_MODS),
         "days": lambda r: str(r.randrange(2, 15))},
        (
            "What is the best time to visit {city} {mod} for {days} days?",
            "When should I travel to {city} {mod} for {days} days?",
            "Which month is best for a {days} day trip to {city} {mod}?",
        ),
    ),
    "leave": (
        {"person": _person, "org": lambda r: r.choice(ORGS)},
        (
            "Why did {person} leave {org}?",
            "What made {person} quit {org}?",
            "Why is {person} no longer working at {org}?",
            "What was the reason {person} left {org}?",
        ),
    ),
    "compare": (
        {"o1": lambda r: r.choice(OBJECTS), "o2": lambda r: r.choice(OBJECTS),
         "city": lambda r: r.choice(CITIES)},
        (
            "Which is better to own in {city}, {a_o1} or {a_o2}?",
            "Should I buy {a_o1} or {a_o2} if I live in {city}?",
            "Living in {city}, is {a_o1} more useful than {a_o2}?",
        ),
    ),
    "salary": (
        {"job": lambda r: r.choice(JOBS), "city": lambda r: r.choice(CITIES),
         "years": lambda r: str(r.randrange(2, 21))},
        (
            "How much does {a_job} with {years} years of experience earn in {city}?",
            "What is the average salary of {a_job} in {city} after {years} years?",
            "How well are {job}s with {years} years of experience paid in {city}?",
        ),
    ),
    "food": (
        {"food": lambda r: r.choice(FOODS), "city": lambda r: r.choice(CITIES),
         "mod": lambda r: r.choice(("cheap", "good", "vegan", "late night", "spicy"))},
        (
            "Where can I find {mod} {food} in {city}?",
            "Which restaurant in {city} serves the best {mod} {food}?",
            "What is the best place to eat {mod} {food} in {city}?",
        ),
    ),
    "become": (
        {"job": lambda r: r.choice(JOBS), "country": lambda r: r.choice(COUNTRIES),
         "age": lambda r: str(r.randrange(18, 61))},
        (
            "How do I become {a_job} in {country} at the age of {age}?",
            "What does it take to become {a_job} in {country} when you are {age}?",
            "At {age}, what are the steps to become {a_job} in {country}?",
        ),
    ),
}
_QQP_FRAME_NAMES = tuple(_QQP_FRAMES)


def _qqp_render(template: str, slots: dict) -> str:
    extra = {}
    for k in ("adj", "o1", "o2", "job"):
        if k in slots:
            extra["a_" + k] = a_an(slots[k])
    return template.format(**slots, **extra)


def _qqp_content(rng: random.Random, frame: str | None = None) -> tuple[str, dict]:
    frame = frame or rng.choice(_QQP_FRAME_NAMES)
    samplers, _ = _QQP_FRAMES[frame]
    slots = {k: f(rng) for k, f in samplers.items()}
    if frame == "compare":
        slots["o2"] = _other(rng, OBJECTS, slots["o1"])
    return frame, slots


def _qqp(rng: random.Random, label: bool) -> tuple[str, str]:
    frame, slots = _qqp_content(rng)
    templates = _QQP_FRAMES[frame][1]
    if label:  # same content, two different phrasings
        t1, t2 = rng.sample(templates, 2)
        q1, q2 = _qqp_render(t1, slots), _qqp_render(t2, slots)
    else:
        if rng.random() < 0.5:  # same frame, one slot changed
            slots2 = dict(slots)
            key = rng.choice(sorted(slots))
            while slots2 == slots or (frame == "compare" and slots2["o1"] == slots2["o2"]):
                slots2[key] = _QQP_FRAMES[frame][0][key](rng)
            frame2 = frame
        else:  # a different question altogether
            frame2, slots2 = _qqp_content(rng, _other(rng, _QQP_FRAME_NAMES, frame))
        q1 = _qqp_render(rng.choice(templates), slots)
        q2 = _qqp_render(rng.choice(_QQP_FRAMES[frame2][1]), slots2)
    return f"Question 1: {q1}\nQuestion 2: {q2}", ("Yes" if label else "No")


# -------------------------------------------------------------------------------- webnlg task
# relation -> (subject type, object type, predicate realisation with the subject dropped).
_REL = {
    "birth place": ("person", "city", "was born in {o}"),
    "residence": ("person", "city", "lives in {o}"),
    "employer": ("person", "org", "works for {o}"),
    "occupation": ("person", "job", "works as {a_o}"),
    "spouse": ("person", "person", "is married to {o}"),
    "birth year": ("person", "year", "was born in the year {o}"),
    "location": ("org", "city", "is based in {o}"),
    "founder": ("org", "person", "was founded by {o}"),
    "founding year": ("org", "year", "was founded in {o}"),
    "industry": ("org", "industry", "is active in the {o} industry"),
    "employees": ("org", "number", "has {o} employees"),
    "country": ("city", "country", "is a city in {o}"),
    "population": ("city", "number", "has a population of {o}"),
    "mayor": ("city", "person", "is led by the mayor {o}"),
}
_REL_BY_SUBJ: dict[str, tuple[str, ...]] = {}
for _r, (_s, _o, _) in _REL.items():
    _REL_BY_SUBJ.setdefault(_s, ())
    _REL_BY_SUBJ[_s] += (_r,)


def _entity(rng: random.Random, etype: str, subj: str) -> str:
    if etype == "person":
        return _person(rng)
    if etype == "city":
        return rng.choice(CITIES)
    if etype == "org":
        return rng.choice(ORGS)
    if etype == "job":
        return rng.choice(JOBS)
    if etype == "year":
        return str(rng.randrange(1940, 2021))
    if etype == "number":
        return str(rng.randrange(12, 990) * 100)
    if etype == "country":
        return COUNTRY_OF[subj]  # facts stay consistent with the world
    if etype == "industry":
        return INDUSTRY_OF[subj]
    raise ValueError(etype)


def _webnlg(rng: random.Random) -> tuple[str, str]:
    n = rng.choice((1, 2, 2, 3, 3, 4, 4))
    stype = rng.choice(("person", "person", "org", "city"))
    subj = _entity(rng, stype, "")
    triples: list[tuple[str, str, str]] = []
    entities = [(subj, stype)]
    used = set()
    while len(triples) < n:
        # WebNLG-like: keep talking about the current subject, or move to an entity mentioned
        # as an object of a previous triple (a chain).
        s, st = entities[0] if rng.random() < 0.6 else rng.choice(entities)
        choices = [r for r in _REL_BY_SUBJ[st] if (s, r) not in used
                   # a lone "city | country" or "org | industry" triple has few values
                   and not (n == 1 and r in ("country", "industry"))]
        if not choices:
            if len(used) >= 64:
                break
            continue
        rel = rng.choice(choices)
        otype = _REL[rel][1]
        o = _entity(rng, otype, s)
        if o == s:
            continue
        used.add((s, rel))
        triples.append((s, rel, o))
        if otype in ("person", "org", "city"):
            entities.append((o, otype))
    source = " ; ".join(f"{s} | {r} | {o}" for s, r, o in triples)
    # Canonical realisation: triples grouped by subject (first-mention order), one sentence per
    # subject: "S p1, p2 and p3."
    groups: dict[str, list[str]] = {}
    for s, r, o in triples:
        groups.setdefault(s, []).append(_REL[r][2].format(o=o, a_o=a_an(o)))
    sentences = []
    for s, preds in groups.items():
        body = preds[0] if len(preds) == 1 else ", ".join(preds[:-1]) + " and " + preds[-1]
        sentences.append(f"{s} {body}.")
    return source, " ".join(sentences)


# -------------------------------------------------------------------------------- samsum task
def _turns(rng: random.Random, options: tuple[str, ...], **slots) -> str:
    return rng.choice(options).format(**slots)


_FILLER = ("ok", "Haha sure", "Sounds good", "Cool", "Great!", "Thanks!", "No problem", "Sure :)")


def _samsum(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.sample(FIRST_NAMES, 3)
    frame = rng.choice(("meet", "late", "borrow", "shop", "gift", "lost", "dinner"))
    day, time, place = rng.choice(DAYS), rng.choice(TIMES), rng.choice(PLACES)
    obj, food = rng.choice(OBJECTS), rng.choice(FOODS)
    lines: list[tuple[str, str]] = []
    if frame == "meet":
        lines += [
            (a, _turns(rng, ("Hi {b}, are you free on {day}?", "Hey {b}! Any plans for {day}?",
                             "{b}, do you have time on {day}?"), b=b, day=day)),
            (b, _turns(rng, ("Yes, why?", "I think so. What's up?",
                             "Sure, what do you have in mind?"))),
            (a, _turns(rng, ("Let's meet at the {place} at {time}.",
                             "Maybe the {place} at {time}?", "How about the {place}, {time}?"),
                       place=place, time=time)),
            (b, _turns(rng, ("Perfect, see you there!", "Great, see you at {time}.", "Deal!"),
                       time=time)),
        ]
        summary = f"{a} and {b} will meet at the {place} on {day} at {time}."
    elif frame == "late":
        n, reason = rng.choice((5, 10, 15, 20, 30, 40)), rng.choice(REASONS)
        lines += [
            (a, _turns(rng, ("{b}, I'm running late, sorry!", "Sorry {b}, I will be late.",
                             "Bad news {b}, I'm late again."), b=b)),
            (b, _turns(rng, ("What happened?", "Oh no, why?", "How late?"))),
            (a, _turns(rng, ("It's {reason}. About {n} minutes.",
                             "{n} minutes, because of {reason}.",
                             "Blame {reason}, {n} minutes or so."), reason=reason, n=n)),
            (b, _turns(rng, ("Ok, I'll wait at the {place}.", "No worries, I'm at the {place}."),
                       place=place)),
        ]
        summary = f"{a} will be {n} minutes late because of {reason}."
    elif frame == "borrow":
        lines += [
            (a, _turns(rng, ("{b}, can I borrow your {obj}?",
                             "Hi {b}! Could you lend me your {obj}?",
                             "{b} do you still have that {obj}? I need it."), b=b, obj=obj)),
            (b, _turns(rng, ("Sure, when do you need it?", "Yes of course. When?"))),
            (a, _turns(rng, ("On {day} if possible.", "{day} would be ideal."), day=day)),
            (b, _turns(rng, ("Ok, I'll bring it on {day}.", "Fine, you'll have it on {day}."),
                       day=day)),
        ]
        summary = f"{b} will lend the {obj} to {a} on {day}."
    elif frame == "shop":
        lines += [
            (a, _turns(rng, ("{b}, are you at the market?", "Are you still in town, {b}?",
                             "{b} where are you?"), b=b)),
            (b, _turns(rng, ("Yes, why?", "Just leaving the office.", "On my way home."))),
            (a, _turns(rng, ("Can you buy some {food} for dinner?",
                             "Could you get {food} on the way home?",
                             "We have nothing to eat, can you bring {food}?"), food=food)),
            (b, _turns(rng, ("Sure, I'll get {food}.", "Ok, {food} it is."), food=food)),
        ]
        summary = f"{b} will buy {food} for {a} on the way home."
    elif frame == "gift":
        lines += [
            (a, _turns(rng, ("{b}, it's {c}'s birthday on {day}!",
                             "Don't forget {c}'s birthday on {day}, {b}."),
                       b=b, c=c, day=day)),
            (b, _turns(rng, ("Oh right! What should we get?", "I forgot. Any gift ideas?"))),
            (a, _turns(rng, ("Maybe {a_obj}?", "What about {a_obj}?", "{c} wanted {a_obj}."),
                       a_obj=a_an(obj), c=c)),
            (b, _turns(rng, ("Good idea, let's buy it together.", "Yes! I'll pay half."))),
        ]
        summary = f"{a} and {b} will buy {a_an(obj)} for {c}'s birthday on {day}."
    elif frame == "lost":
        lines += [
            (a, _turns(rng, ("{b}, have you seen my {obj}?", "I can't find my {obj}, {b}!",
                             "{b} did I leave my {obj} with you?"), b=b, obj=obj)),
            (b, _turns(rng, ("You left it at the {place}.", "Yes, it was at the {place}."),
                       place=place)),
            (a, _turns(rng, ("Phew! Can you keep it until {day}?",
                             "Thank god. I'll get it on {day}."),
                       day=day)),
            (b, _turns(rng, ("Sure, see you on {day}.", "No problem."), day=day)),
        ]
        summary = f"{a} left the {obj} at the {place} and {b} will keep it until {day}."
    else:  # dinner
        lines += [
            (a, _turns(rng, ("{b}, come over for dinner on {day}?",
                             "Hi {b}, dinner at my place on {day}?"),
                       b=b, day=day)),
            (b, _turns(rng, ("I'd love to! What are you cooking?", "Yes! What's on the menu?"))),
            (a, _turns(rng, ("{food}! Be there at {time}.", "I'm making {food}. Come at {time}."),
                       food=food, time=time)),
            (b, _turns(rng, ("Yum, see you at {time}.", "Can't wait!"), time=time)),
        ]
        summary = f"{a} invited {b} for {food} on {day} at {time}."
    # Optional filler turns: surface variety that does not change the summary.
    if rng.random() < 0.5:
        lines.append((a, rng.choice(_FILLER)))
    if rng.random() < 0.3:
        lines.insert(1, (a, rng.choice(("?", "hello?", "are you there?"))))
    return "\n".join(f"{who}: {text}" for who, text in lines), summary


# ------------------------------------------------------------------------------ gigaword task
def _gigaword(rng: random.Random) -> tuple[str, str]:
    frame = rng.choice(("buy", "appoint", "factory", "storm", "match", "prices", "strike", "visit"))
    day, city = rng.choice(DAYS), rng.choice(CITIES)
    org = rng.choice(ORGS)
    if frame == "buy":
        org2, amount = _other(rng, ORGS, org), rng.randrange(2, 101) * 10
        doc = rng.choice((
            "{org} said on {day} it had agreed to buy {org2} for {amount} million dollars, in "
            "a deal that will expand its business in {city}.",
            "In a deal announced on {day}, {org} will pay {amount} million dollars to buy "
            "{org2}, which employs hundreds of people in {city}.",
            "{org2} has accepted an offer of {amount} million dollars from {org}, the two "
            "companies said on {day} in {city}.",
        )).format(org=org, org2=org2, day=day, amount=amount, city=city)
        head = f"{org} to buy {org2} for {amount} million dollars"
    elif frame == "appoint":
        person, job = _person(rng), rng.choice(JOBS)
        doc = rng.choice((
            "{org} on {day} named {person}, a former {job} from {city}, as its new chief "
            "executive, the company said.",
            "{person}, who worked as {a_job} in {city}, will become the new chief executive of "
            "{org}, the company said on {day}.",
        )).format(org=org, day=day, person=person, job=job, a_job=a_an(job), city=city)
        head = f"{org} names {person} new chief executive"
    elif frame == "factory":
        n = rng.randrange(1, 60) * 50
        doc = rng.choice((
            "{org} will open a new factory in {city} next year, creating about {n} jobs, "
            "officials said on {day}.",
            "About {n} new jobs will be created in {city} when {org} opens a factory there "
            "next year, the mayor said on {day}.",
        )).format(org=org, city=city, n=n, day=day)
        head = f"{org} to open factory in {city}"
    elif frame == "storm":
        n = rng.randrange(2, 80)
        doc = rng.choice((
            "At least {n} people were killed when a storm hit {city} on {day}, local police said.",
            "A powerful storm that hit {city} on {day} has killed at least {n} people, "
            "officials said, as rescue teams searched for survivors.",
        )).format(n=n, city=city, day=day)
        head = f"storm kills {n} in {city}"
    elif frame == "match":
        c2 = _other(rng, CITIES, city)
        t1 = f"{city} {rng.choice(('United', 'Rovers', 'Athletic'))}"
        t2 = f"{c2} {rng.choice(('City', 'Wanderers', 'Rangers'))}"
        g2 = rng.randrange(0, 5)
        g1 = rng.randrange(g2 + 1, 7)  # the first-named team wins
        person = _person(rng)
        doc = rng.choice((
            "{t1} beat {t2} {g1}-{g2} on {day} to move to the top of the league, with {person} "
            "scoring twice.",
            "{person} scored twice as {t1} beat {t2} {g1}-{g2} in front of a home crowd on {day}.",
        )).format(t1=t1, t2=t2, g1=g1, g2=g2, day=day, person=person)
        head = f"{t1} beat {t2} {g1}-{g2}"
    elif frame == "prices":
        country, goods = rng.choice(COUNTRIES), rng.choice(GOODS)
        n, month, k = rng.randrange(2, 31), rng.choice(MONTHS), rng.randrange(2, 21)
        doc = rng.choice((
            "The price of {goods} in {country} rose by {n} percent in {month}, the highest "
            "rise in {k} years, the statistics office said on {day}.",
            "Shoppers in {country} paid {n} percent more for {goods} in {month} than a year "
            "earlier, official figures showed on {day}.",
        )).format(goods=goods, country=country, n=n, month=month, k=k, day=day)
        head = f"{goods} prices in {country} rise {n} percent"
    elif frame == "strike":
        doc = rng.choice((
            "Workers at {org} in {city} went on strike on {day} demanding higher pay, a union "
            "leader said.",
            "Hundreds of {org} workers in {city} stopped work on {day} in a dispute over pay, "
            "the union said.",
        )).format(org=org, city=city, day=day)
        head = f"{org} workers strike in {city}"
    else:  # visit
        c2, person = _other(rng, CITIES, city), _person(rng)
        doc = rng.choice((
            "{person}, the mayor of {city}, will visit {c2} next week to discuss trade and "
            "tourism, a spokesman said on {day}.",
            "The mayor of {city}, {person}, is expected in {c2} next week for talks on trade "
            "and tourism, officials said on {day}.",
        )).format(person=person, city=city, c2=c2, day=day)
        head = f"{city} mayor to visit {c2}"
    return doc, head


# ----------------------------------------------------------------------------- instructions
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "qqp": (
        "Are these two questions asking the same thing? Answer Yes or No.",
        "Do the following questions have the same meaning?",
        "Decide whether the two questions are paraphrases of each other.",
        "Is the second question a paraphrase of the first one? Answer Yes or No.",
    ),
    "webnlg": (
        "Write a sentence that describes the following data.",
        "Turn these triples into fluent text.",
        "Organize this data into a readable text.",
        "Describe the facts below in plain English.",
    ),
    "samsum": (
        "Summarize this conversation.",
        "Write a short summary of the dialogue below.",
        "What is the main point of this chat? Summarize it.",
        "Briefly summarize the following dialogue.",
    ),
    "gigaword": (
        "Write a headline for this news sentence.",
        "Summarize this text in a few words.",
        "Generate a short title for the following article.",
        "What would be a good headline for this news?",
    ),
}


# ---------------------------------------------------------------------------------- public API
def _rng(task: str, seed: int, salt: str = "") -> random.Random:
    return random.Random(f"fedrouter:{task}:{int(seed)}{salt}")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def generate_examples(task: str, n: int, seed: int, *, unique: bool = True) -> list[dict]:
    """``n`` synthetic examples of ``task`` as dicts ``{task, instruction, input, output}``.

    Args:
      task: one of :data:`TASKS`.
      n: number of examples (>= 0).
      seed: any int; same (task, seed, n, unique) -> identical list. The first ``m`` examples
        of a call with ``n >= m`` equal the ``m`` examples of a call with ``n = m``.
      unique: if True (default), no two returned examples share an ``input`` (redraws on a
        collision), so train/test splits cut from one call never leak.

    qqp labels are exactly balanced: each consecutive pair of examples holds one Yes and one No
    in random order (from a separate label stream, so a redraw keeps its label).
    """
    _check_task(task)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _rng(task, seed)
    # qqp labels: exactly balanced prefix-wise in pairs (Yes/No per consecutive pair, order
    # random), drawn from a separate stream so redraws do not shift them.
    label_rng = _rng(task, seed, ":labels")
    seen: set[str] = set()
    out: list[dict] = []
    instructions = INSTRUCTIONS[task]
    max_tries = 50 * n + 1000
    tries = 0
    pair_first, pair_for = True, -1
    while len(out) < n:
        i = len(out)
        if task == "qqp":
            if i % 2 == 0 and pair_for != i:  # a new Yes/No pair; redraws keep the label
                pair_first, pair_for = label_rng.random() < 0.5, i
            label = pair_first if i % 2 == 0 else not pair_first
            inp, outp = _qqp(rng, label)
        elif task == "webnlg":
            inp, outp = _webnlg(rng)
        elif task == "samsum":
            inp, outp = _samsum(rng)
        else:
            inp, outp = _gigaword(rng)
        instruction = rng.choice(instructions)
        tries += 1
        if unique:
            if inp in seen:
                if tries > max_tries:
                    raise RuntimeError(f"could not draw {n} unique {task} examples")
                continue
            seen.add(inp)
        out.append({"task": task, "instruction": instruction, "input": inp, "output": outp})
    return out


def generate_task(task: str, n: int, seed: int, *, unique: bool = True):
    """Same as :func:`generate_examples` as a ``datasets.Dataset`` with columns
    ``task, instruction, input, output``."""
    import datasets

    rows = generate_examples(task, n, seed, unique=unique)
    cols = ("task", "instruction", "input", "output")
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in cols})


# ------------------------------------------------------------------------- pretraining corpus
def _describe_person(rng: random.Random) -> str:
    p = _person(rng)
    first = p.split()[0]
    return rng.choice((
        "{p} is {a_job} who lives in {city}. {first} likes {food} and wants to learn to {act}.",
        "{p} grew up in {city} and now works for {org}. On {day}s {first} usually goes to the "
        "{place}.",
        "{first} {last} has {a_obj} and often takes it to the {place} in {city}.",
    )).format(p=p, first=first, last=p.split()[1], a_job=a_an(rng.choice(JOBS)),
              city=rng.choice(CITIES), food=rng.choice(FOODS), act=rng.choice(ACTIVITIES),
              org=rng.choice(ORGS), day=rng.choice(DAYS), place=rng.choice(PLACES),
              a_obj=a_an(rng.choice(OBJECTS)))


def _describe_org(rng: random.Random) -> str:
    org = rng.choice(ORGS)
    return rng.choice((
        "{org} is a {ind} company from {city} in {country}.",
        "Many people in {city} work for {org}, which sells {obj}s and other products.",
        "{org} was started by {p} and is known in {country} for its {ind} business.",
    )).format(org=org, ind=INDUSTRY_OF[org], city=(c := rng.choice(CITIES)),
              country=COUNTRY_OF[c], obj=rng.choice(OBJECTS), p=_person(rng))


def _profile(rng: random.Random) -> str:
    """Several facts about one person, the full name repeated (generic text, no triples)."""
    p = _person(rng)
    facts = [
        f"{p} works as {a_an(rng.choice(JOBS))}.", f"{p} lives in {rng.choice(CITIES)}.",
        f"{p} was born in {rng.randrange(1940, 2021)}.", f"{p} works for {rng.choice(ORGS)}.",
        f"{p} is married to {_person(rng)}.", f"{p} likes {rng.choice(FOODS)}.",
        f"On {rng.choice(DAYS)}s {p} goes to the {rng.choice(PLACES)}.",
        f"{p} wants to learn to {rng.choice(ACTIVITIES)}.",
    ]
    rng.shuffle(facts)
    return " ".join(facts[: rng.randrange(2, 6)])


def _news_followup(rng: random.Random) -> str:
    """A news sentence, then a sentence that names one of its entities again."""
    doc = _gigaword(rng)[0]
    names = [n for n in ORGS + CITIES if n in doc] or [rng.choice(ORGS)]
    name = rng.choice(names)
    follow = rng.choice((
        "More details about {n} are expected later this week.",
        "{n} has been in the news several times this year.",
        "Reporters in {n} could not get further comment.",
        "People who know {n} well were not surprised.",
    )).format(n=name)
    return f"{doc} {follow}"


def generic_corpus(n_docs: int, seed: int) -> list[str]:
    """``n_docs`` generic documents from the same world, for pretraining a tiny base LM.

    Documents are entity descriptions, relation statements, dialogues, news sentences and single
    questions. They are NOT the task mappings: no instruction -> output pairs, no "### Response:"
    formatting, no summary after a dialogue, no headline after a news sentence, no Yes/No after a
    question pair, no triples. So a base LM trained on them knows the world's vocabulary but has
    low zero-shot ROUGE-1 on the tasks. Deterministic by ``seed``.
    """
    rng = random.Random(f"fedrouter:corpus:{int(seed)}")
    docs = []
    for _ in range(n_docs):
        kind = rng.randrange(8)
        if kind == 6:  # one entity, several sentences: names recur, so the model learns to copy
            docs.append(_profile(rng))
            continue
        if kind == 7:  # a news sentence and a follow-up that mentions its entities again
            docs.append(_news_followup(rng))
            continue
        parts = []
        for _ in range(rng.randrange(1, 4)):
            if kind == 0:
                parts.append(_describe_person(rng))
            elif kind == 1:
                parts.append(_describe_org(rng))
            elif kind == 2:  # relation statements: the realisation only, never the triples
                parts.append(_webnlg(rng)[1])
            elif kind == 3:  # a dialogue alone
                parts.append(_samsum(rng)[0])
                break
            elif kind == 4:  # a news sentence alone
                parts.append(_gigaword(rng)[0])
            else:  # single questions
                frame, slots = _qqp_content(rng)
                parts.append(_qqp_render(rng.choice(_QQP_FRAMES[frame][1]), slots))
        docs.append(("\n" if kind == 3 else " ").join(parts))
    return docs
