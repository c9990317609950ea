"""More calibration text for GPTQ (written for this toolkit; deliberately not any evaluation text).

GPTQ fits each Linear to the span of its calibration inputs: with a few hundred tokens the Hessian of a wide
layer (K = 1536 for SmolLM2's down_proj, 8192 for Phi-3-mini's) has low rank and the fit overfits the sample.
This adds varied registers (narrative, dialogue, instructions, lists, code, numbers, verse) to the short
`calibration.CALIBRATION_TEXT`, which stays as it is for the `weighted` clip method.
"""

EXTRA_TEXT = """\
Chapter One. The lighthouse keeper kept two notebooks. In the first he wrote the weather: wind from the
south-west, force five, rain after midnight, a long swell from the open sea. In the second he wrote what he
saw: a fishing boat that turned back early, a flock of gulls that circled the rocks for an hour, a light
on the far shore that blinked three times and went dark. When his daughter asked why he needed two books, he
said that one was for the ships and the other was for himself.
"Are you coming down for supper?" his wife called up the stairs.
"In a minute. The lamp needs oil, and I want to finish this page."
"You said that an hour ago."
"Then I was right an hour ago, too," he answered, and she laughed despite herself.
How to make bread at home. Mix five hundred grams of flour with ten grams of salt and seven grams of dried
yeast. Add three hundred and fifty millilitres of warm water and stir until no dry flour remains. Knead the
dough for ten minutes on a floured table, then leave it in a covered bowl until it has doubled in size, which
takes about an hour in a warm kitchen. Shape it into a loaf, let it rise again for thirty minutes, and bake it
at two hundred and twenty degrees for thirty-five minutes. The loaf is done when it sounds hollow underneath.
Dear Ms. Okafor, thank you for your letter of 12 March. I am pleased to confirm that your application has been
accepted and that the first meeting of the committee will take place on Tuesday at 10:30 in room 4B. Please
bring a copy of your report and any figures you would like to discuss. If you have questions before then,
do not hesitate to contact me. With kind regards, Daniel Weber, Secretary.
The village market opens at dawn. By seven the square is full: apples and pears in wooden crates, cheeses
wrapped in cloth, honey in tall jars, bunches of thyme and rosemary, and a man who sharpens knives on a
stone wheel powered by his bicycle. Children run between the stalls, dogs wait hopefully near the butcher,
and the old women who have come every Saturday for fifty years argue cheerfully about the price of eggs.
class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

for i in range(1, 16):
    if i % 15 == 0:
        print("FizzBuzz")
    elif i % 3 == 0:
        print("Fizz")
    elif i % 5 == 0:
        print("Buzz")
    else:
        print(i)
SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id = customers.id
WHERE orders.created_at >= '2024-01-01' GROUP BY name ORDER BY orders DESC LIMIT 10;
Q: A train leaves at 14:05 and arrives at 17:50. How long is the journey? A: From 14:05 to 17:05 is three
hours, and from 17:05 to 17:50 is forty-five minutes, so the journey takes three hours and forty-five minutes.
Q: If a shirt costs 40 dollars and is reduced by 25 percent, what is the new price? A: A quarter of 40 is 10,
so the new price is 30 dollars.
Q: What is the capital of Japan? A: Tokyo.
The human heart beats about one hundred thousand times a day. Blood leaves the left ventricle through the
aorta, travels through arteries that branch into ever smaller vessels, and reaches the capillaries, where
oxygen passes into the tissues. It returns through the veins to the right side of the heart, which pumps it
through the lungs to collect fresh oxygen before the cycle begins again.
Winter came early that year. The river froze in November, and the ferry stopped running, so the children from
the far bank walked across the ice to school, testing each step with a long pole as their grandparents had
taught them. Their teacher, who had grown up in the city, watched from the window every morning with her heart
in her mouth until the last small figure reached the shore.
Meeting notes, project Alder. Attendees: Priya, Tom, Lucia, Ahmed. 1. The test suite is green on all
platforms except the nightly build, which times out on the slowest runner. Tom will split the long tests into
a separate job. 2. The release is moved to the 28th to leave time for the documentation review. 3. Lucia
raised the question of the old configuration format; we agreed to keep reading it for one more release and to
print a warning that explains how to migrate. Action items are listed in the tracker.
The poet wrote: the morning comes on quiet feet, / it finds the kettle and the empty street, / it lays a hand
upon the sleeping town / and gently, gently turns the darkness down.
Photosynthesis turns light into chemical energy. In the leaves of green plants, chlorophyll absorbs red and
blue light, and the energy drives a chain of reactions that split water, release oxygen and build sugars from
carbon dioxide. Almost every food chain on land begins with this process, and the oxygen we breathe is its
by-product.
"I don't think the map is wrong," said Marcus, turning it upside down. "I think we are."
"That's comforting," said Ella. "Which way is north?"
"Towards the mountains. Probably. Unless those are hills."
They walked on, arguing happily, until the path ended at a wooden gate with a sign that read: Private.
Beware of the goose. There was, indeed, a goose, and it did not look pleased to see them.
Economists measure inflation with a basket of goods: bread, rent, fuel, clothing, transport and hundreds of
other items, each weighted by how much a typical household spends on it. When the price of the basket rises
by three percent over a year, the inflation rate is three percent, though the experience of any one family
depends on what it actually buys.
Step 1: Unplug the device and remove the back cover with a small screwdriver. Step 2: Disconnect the battery
by lifting the connector gently; do not pull on the wires. Step 3: Replace the fuse with one of the same
rating, marked 2A on the board. Step 4: Reconnect the battery, close the cover and switch the device on. If
the green light does not appear within ten seconds, contact the service centre.
Der Zug nach Berlin hatte zwanzig Minuten Verspätung, aber niemand schien sich daran zu stören. El mercado
estaba lleno de gente y de colores, y el olor del pan recién hecho llenaba la calle.
In mathematics, a prime number has exactly two divisors: one and itself. The first primes are 2, 3, 5, 7, 11,
13, 17, 19, 23 and 29. Euclid proved more than two thousand years ago that there are infinitely many of them:
if there were a largest prime, multiplying all the primes together and adding one would give a number that no
prime on the list divides.
The storm reached the coast late on Friday. Roofs lost their tiles, a tree fell across the railway line near
the station, and the harbour wall, built in 1872, finally gave way at its eastern end. By Sunday the wind had
dropped, the sun came out, and half the town was on the beach, looking at the wreckage and the strange things
the sea had thrown up: a ship's bell, a child's boot, and a great deal of seaweed.
"""
