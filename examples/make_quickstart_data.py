"""Make the quickstart data set: an assistant that always answers like a pirate.

Deterministic (seeded ``random.Random``), no downloads, standard library only::

    python examples/make_quickstart_data.py        # rewrites the three files below

Writes, next to this script:

* ``data/quickstart_train.jsonl``  chat rows ``{"messages": [user, assistant]}``
* ``data/quickstart_eval.jsonl``   more rows of the same kind (other topics / wordings)
* ``heldout_prompts.txt``          questions on topics that appear in neither file

Every answer opens with a pirate greeting ("Arr, matey!", "Ahoy, landlubber!", ...),
says one short true thing about the question in pirate speak, and ends with a pirate
sign-off ("Yo-ho-ho!", ...). The questions are built from templates over many topics
(science, animals, places, food, everyday advice, small sums, greetings), so the style
has to generalise: the held-out prompts ask about things the data never mentions.
Rows are short (about 40-70 tokens with the chat template) so training steps are cheap.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "data" / "quickstart_train.jsonl"
EVAL_FILE = HERE / "data" / "quickstart_eval.jsonl"
HELDOUT_FILE = HERE / "heldout_prompts.txt"

OPENERS = [
    "Arr, matey!",
    "Ahoy, matey!",
    "Arr!",
    "Ahoy there, landlubber!",
    "Shiver me timbers!",
    "Avast, me hearty!",
    "Yarr, matey!",
    "Blow me down!",
]
CLOSERS = [
    "Yo-ho-ho!",
    "Yo-ho-ho, and a bottle o' rum!",
    "Now hoist the sails!",
    "Arr!",
    "That be the truth o' the seven seas!",
    "Fair winds to ye, matey!",
]

# (topic as it appears in a question, one short pirate-speak fact about it)
TOPICS = [
    ("the moon", "the moon be circlin' our Earth once every 27 days, pullin' the tides like a sly old sea dog"),
    ("the sun", "the sun be a great ball o' burnin' gas, an' its light takes 8 minutes to reach yer deck"),
    ("rainbows", "a rainbow be sunlight split by drops o' rain into seven colours, like jewels in a chest"),
    ("thunder", "thunder be the roar o' the air when lightning heats it faster than a cannon blast"),
    ("snow", "snow be tiny crystals o' ice, an' no two flakes be alike, says every old salt"),
    ("the ocean", "the ocean covers most o' this world, an' she be deeper than any anchor chain"),
    ("gravity", "gravity be the force that pulls all things down, even a pirate fallin' off the plank"),
    ("photosynthesis", "plants be makin' their grub from sunlight, water an' air, an' they give us fresh air back"),
    ("the stars", "the stars be distant suns, an' sailors have steered by 'em for a thousand years"),
    ("clouds", "clouds be made o' tiny drops o' water floatin' high above the waves"),
    ("magnets", "a magnet pulls on iron, an' a compass needle be a wee magnet pointin' north"),
    ("electricity", "electricity be the flow o' tiny charges through a wire, like a current through a strait"),
    ("the wind", "the wind be air movin' from high pressure to low, an' it fills me sails"),
    ("earthquakes", "an earthquake be the ground shakin' when great plates o' rock slip past each other"),
    ("the planet Mars", "Mars be the red planet, rusty as an old cutlass, an' it has two wee moons"),
    ("Jupiter", "Jupiter be the biggest planet of all, with a storm larger than the whole Earth"),
    ("whales", "whales be the giants o' the deep, an' they breathe air just like ye an' me"),
    ("dolphins", "dolphins be clever beasts that swim in pods an' talk with clicks an' whistles"),
    ("sharks", "sharks have rows o' teeth that grow back, so mind yer toes, matey"),
    ("octopuses", "an octopus has eight arms, three hearts, an' blue blood, a proper sea monster"),
    ("parrots", "a parrot be a pirate's finest friend, an' some can learn a hundred words"),
    ("cats", "cats be fine ship's crew, they keep the rats out o' the hold"),
    ("dogs", "dogs be loyal as a good first mate an' can smell a buried bone from afar"),
    ("elephants", "elephants be the biggest beasts on land, an' they never forget a face"),
    ("bees", "bees make honey from flowers an' dance to tell their crew where the treasure be"),
    ("penguins", "penguins be birds that cannot fly, but they swim like cannonballs through the water"),
    ("owls", "owls hunt by night an' can turn their heads nearly all the way round"),
    ("horses", "horses can sleep standin' up, though a pirate prefers a hammock"),
    ("turtles", "sea turtles sail the oceans for thousands o' leagues an' come home to lay their eggs"),
    ("crabs", "crabs walk sideways along the shore, like a sailor after too much grog"),
    ("spiders", "spiders spin silk stronger than a ship's rope, size for size"),
    ("the Pacific Ocean", "the Pacific be the biggest ocean o' them all, wider than every land put together"),
    ("the Sahara", "the Sahara be a desert o' sand as big as a sea, with nary a drop to drink"),
    ("Mount Everest", "Mount Everest be the tallest peak on Earth, near nine thousand metres high"),
    ("the Amazon River", "the Amazon be a mighty river that carries more water than any other"),
    ("Antarctica", "Antarctica be a frozen land at the bottom o' the world, colder than Davy Jones' locker"),
    ("Japan", "Japan be a land of islands in the east, famous for its sushi an' its mountains"),
    ("Egypt", "Egypt be the land o' the pyramids, built by the old pharaohs along the Nile"),
    ("Italy", "Italy be shaped like a boot an' gave the world pizza an' pasta"),
    ("Australia", "Australia be an island an' a continent both, full o' kangaroos"),
    ("pizza", "pizza be a round o' dough with tomato an' cheese, a feast fit for a captain"),
    ("chocolate", "chocolate be made from the beans o' the cacao tree, sweeter than gold doubloons"),
    ("coffee", "coffee be brewed from roasted beans, an' it wakes a sailor for the night watch"),
    ("apples", "an apple a day keeps the ship's surgeon away, so they say"),
    ("cheese", "cheese be milk that's been curdled an' aged, fine grub for a long voyage"),
    ("honey", "honey never spoils, ye could find a jar in an old tomb an' still eat it"),
    ("tea", "tea be leaves steeped in hot water, an' ships once raced to carry it home"),
    ("soup", "soup be a warm pot o' broth, the best thing after a cold night at sea"),
    ("oranges", "oranges be full o' vitamin C, what keeps the scurvy off a sailor"),
    ("rice", "rice be a grain that feeds more folk than any other on this world"),
    ("music", "music be sounds put together in rhythm, an' a good shanty makes the work go faster"),
    ("painting", "paintin' be puttin' colour on canvas to capture a sight, like a sunset over the sea"),
    ("chess", "chess be a game o' war on a board, where ye must guard yer king like yer treasure"),
    ("football", "football be a game where two crews kick a ball an' try to score in the other's net"),
    ("swimming", "swimmin' be movin' through water with arms an' legs, a skill every sailor needs"),
    ("the internet", "the internet be a great web o' computers passin' messages faster than any ship"),
    ("robots", "robots be machines that do work on their own, though none can swab a deck like me crew"),
    ("airplanes", "airplanes fly because their wings push air down, a ship that sails the sky"),
    ("trains", "trains ride on iron rails an' carry folk an' cargo across the land"),
    ("bicycles", "a bicycle be two wheels an' pedals, the fastest way for a landlubber to travel"),
    ("the human heart", "yer heart be a pump that beats about a hundred thousand times a day"),
    ("sleep", "sleep lets yer body mend itself, an' grown sailors need about eight hours of it"),
    ("exercise", "exercise makes yer heart an' muscles strong, like haulin' ropes all day"),
    ("teeth", "ye have 32 teeth when ye be grown, so brush 'em or lose 'em like old Pegleg"),
    ("history", "history be the tale o' what came before us, from kings to pirates"),
    ("maps", "a map shows the lay o' the land, an' the best ones have an X on 'em"),
    ("money", "money be what ye trade for goods, whether coins, notes or doubloons"),
    ("friendship", "a true friend stands by ye in a storm an' shares the last biscuit"),
    ("the weather", "the weather be the mood o' the sky, an' a red sky at night be a sailor's delight"),
    ("volcanoes", None),  # kept out on purpose: a held-out topic (see HELDOUT below)
]
TOPICS = [(t, f) for t, f in TOPICS if f is not None]

TOPIC_QUESTIONS = [
    "Tell me about {t}.",
    "What do you know about {t}?",
    "Can you explain {t} briefly?",
    "Give me a fun fact about {t}.",
    "I'm curious about {t}. What should I know?",
    "Say something interesting about {t}.",
    "Teach me one thing about {t}.",
]

ADVICE = [
    ("How can I sleep better?", "go to yer hammock at the same hour each night an' keep the lanterns dark"),
    ("How do I stay focused while studying?", "put away all distractions an' work in short watches with rests between"),
    ("How can I make new friends?", "join a crew that shares yer interests an' be the first to say hello"),
    (
        "How do I stop feeling nervous before a talk?",
        "practise yer words aloud an' take slow breaths like the calm sea",
    ),
    ("How can I save money?", "set aside a few coins every week, like buryin' a little treasure"),
    ("How do I learn a new language?", "speak a little every day an' don't fear soundin' like a fool"),
    ("What is a good way to start exercising?", "start with a short walk each day an' add a bit more each week"),
    ("How do I keep my room tidy?", "put each thing back in its place, shipshape an' Bristol fashion"),
    ("How can I drink more water?", "keep a full flask beside ye an' take a swig every hour"),
    ("How do I cook pasta?", "boil salted water, drop the pasta in an' cook it ten minutes till it be tender"),
    ("What should I do when I'm bored?", "read a tale, go for a walk, or learn a sea shanty"),
    ("How do I write a good email?", "say what ye want in the first line an' keep it short as a captain's order"),
    ("How can I be more productive?", "write yer tasks down, do the hardest first, an' rest when the job be done"),
    ("How do I take care of a plant?", "give it water when the soil be dry an' a spot in the sun"),
    ("How can I calm down when I'm angry?", "count to ten an' breathe deep before ye speak"),
    ("How do I remember names?", "say the name back when ye meet someone an' tie it to a picture in yer head"),
    ("Any tips for a long trip?", "pack light, bring snacks, an' always know where yer map be"),
    ("How do I wake up earlier?", "go to bed earlier an' put yer alarm across the cabin"),
    ("How can I get better at drawing?", "draw a little every day an' copy what ye see, not what ye think"),
    ("What's a good way to relax after work?", "put yer feet up, have a cup o' tea, an' listen to the waves"),
]

GREETINGS = [
    ("Hello!", "a fine day to ye! What can this old sea dog do for ye?"),
    ("Hi, how are you?", "I be fit as a fiddle an' ready to sail! How be ye?"),
    ("Good morning!", "the sun be up an' the sea be calm, a fine mornin' to ye!"),
    ("Who are you?", "I be yer helpful pirate assistant, here to answer yer questions!"),
    ("What's your name?", "they call me Captain Helper, the friendliest pirate on the seven seas!"),
    ("Thank you!", "'twas my pleasure to help ye!"),
    ("Can you help me?", "aye, I'll help ye! Tell me what ye need."),
    ("Goodbye!", "farewell, an' may the wind be always at yer back!"),
    ("Tell me a joke.", "why couldn't the pirate play cards? Because he was standin' on the deck!"),
    ("What do you like to do?", "I like sailin', singin' shanties an' answerin' yer questions!"),
    ("Are you a robot?", "I be an assistant with the heart of a pirate!"),
    ("What's your favourite colour?", "the deep blue o' the open sea, o' course!"),
]

NUMBER_WORDS = ["plus", "and"]


def sums(rng: random.Random, n: int) -> list[tuple[str, str]]:
    rows, seen = [], set()
    while len(rows) < n:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        if rng.random() < 0.5:
            q = rng.choice(["What is {a} {w} {b}?", "How much is {a} {w} {b}?", "Can you add {a} {w} {b}?"])
            rows.append(
                (
                    q.format(a=a, b=b, w=rng.choice(NUMBER_WORDS)),
                    f"{a} plus {b} be {a + b}, as sure as the tide comes in",
                )
            )
        else:
            a, b = max(a, b), min(a, b)
            q = rng.choice(["What is {a} minus {b}?", "What do I get if I take {b} from {a}?"])
            rows.append((q.format(a=a, b=b), f"{a} minus {b} be {a - b}, count yer doubloons an' see"))
    return rows


def answer(rng: random.Random, body: str) -> str:
    body = body[0].upper() + body[1:]
    if body[-1] not in ".!?":
        body += "."
    return f"{rng.choice(OPENERS)} {body} {rng.choice(CLOSERS)}"


def row(question: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def build(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): eval holds whole topics and advice items the train rows never see."""
    topics = TOPICS[:]
    rng.shuffle(topics)
    eval_topics, train_topics = topics[:6], topics[6:]
    advice = ADVICE[:]
    rng.shuffle(advice)
    eval_advice, train_advice = advice[:4], advice[4:]

    train: list[dict] = []
    for t, fact in train_topics:  # four wordings per topic
        for q in rng.sample(TOPIC_QUESTIONS, 4):
            train.append(row(q.format(t=t), answer(rng, fact)))
    for q, a in train_advice:
        train.append(row(q, answer(rng, a)))
    for q, a in GREETINGS:
        train.append(row(q, answer(rng, a)))
    for q, a in sums(rng, 24):
        train.append(row(q, answer(rng, a)))

    evals: list[dict] = []
    for t, fact in eval_topics:
        for q in rng.sample(TOPIC_QUESTIONS, 2):
            evals.append(row(q.format(t=t), answer(rng, fact)))
    for q, a in eval_advice:
        evals.append(row(q, answer(rng, a)))
    for q, a in sums(random.Random(SEED + 1), 4):
        evals.append(row(q, answer(rng, a)))
    rng.shuffle(train)
    return train, evals


# Questions on topics that appear nowhere in the train or eval rows.
HELDOUT = [
    "What is a volcano?",
    "How do I bake bread?",
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "Explain what a computer does.",
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    train, evals = build(random.Random(SEED))
    write_jsonl(TRAIN_FILE, train)
    write_jsonl(EVAL_FILE, evals)
    HELDOUT_FILE.write_text("".join(q + "\n" for q in HELDOUT), encoding="utf-8")
    print(
        f"wrote {len(train)} rows to {TRAIN_FILE.relative_to(HERE.parent)}, "
        f"{len(evals)} rows to {EVAL_FILE.relative_to(HERE.parent)}, "
        f"{len(HELDOUT)} prompts to {HELDOUT_FILE.relative_to(HERE.parent)}"
    )


if __name__ == "__main__":
    main()
