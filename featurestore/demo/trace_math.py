"""Math trace templates: word problems whose numbers are drawn from the row's RNG and whose answers are computed."""
from __future__ import annotations

import math
import random

from .trace_voice import NAMES, Trace, Voice, money, number

_ITEMS = ["pencils", "notebooks", "apples", "movie tickets", "muffins", "bus passes", "stickers", "mangoes"]
_SRC = "featurestore-demo/math-"


def _boxed(x) -> str:
    return f"\\boxed{{{x}}}"


def shopping_change(rng: random.Random, v: Voice) -> Trace:
    name, items = rng.choice(NAMES), rng.choice(_ITEMS)
    n, price = rng.randint(2, 12), rng.randrange(25, 500, 5)
    total = n * price
    bill = next(b for b in (500, 1000, 2000, 5000, 10000, 20000) if b > total)
    change = bill - total
    prompt = (f"{name} buys {n} {items} that cost {money(price)} each and pays with a {money(bill)} bill. "
              f"How much change does {name} receive?")
    dollars, cents = price // 100 * 100, price % 100
    t = [v.open(f"find how much change {name} gets back"),
         f"First, the total cost. There are {n} {items} at {money(price)} each, so the total is {n} × {money(price)}."]
    t += v.slip(f"{n} × {money(price)} = {money(total + price)}.",
                f"Let me recompute: {money(dollars)} × {n} + {money(cents)} × {n} = {money(dollars * n)} + "
                f"{money(cents * n)} = {money(total)}.",
                f"{money(dollars)} × {n} = {money(dollars * n)}, and {money(cents)} × {n} = {money(cents * n)}, "
                f"so the total is {money(total)}.")
    t += v.digressions()
    t.append(f"{v.then()} the change is {money(bill)} - {money(total)} = {money(change)}.")
    if v.extra():
        t.append(f"{v.check()} {money(total)} + {money(change)} = {money(bill)}. {v.confirm()}")
    t.append(v.conclude(money(change)))
    answer = (f"The total cost is {n} × {money(price)} = {money(total)}, so the change is "
              f"{money(bill)} - {money(total)} = **{money(change)}**.")
    return Trace(prompt, t, answer, _SRC + "arithmetic")


def linear_equation(rng: random.Random, v: Voice) -> Trace:
    a, x = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 11, 12]), rng.randint(-15, 20)
    b = rng.choice([i for i in range(-30, 31) if i])
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    prompt = f"Solve for x: {a}x {sign} {abs(b)} = {c}."
    t = [v.open("solve a linear equation for x")]
    move = f"{c} - {b}" if b >= 0 else f"{c} + {abs(b)}"
    t += v.slip(f"Subtract {b} from both sides: {a}x = {c + b}.",
                f"Moving {b} to the other side changes its sign, so {a}x = {move} = {a * x}.",
                f"Move the constant to the right side: {a}x = {move} = {a * x}.")
    t.append(f"{v.then()} divide both sides by {a}: x = {a * x} / {a} = {x}.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} Plug x = {x} back in: {a} × {x} {sign} {abs(b)} = {a * x} {sign} {abs(b)} = {c}. "
                 f"{v.confirm()}")
    t.append(v.conclude(f"x = {x}"))
    return Trace(prompt, t, f"Subtracting {b} and dividing by {a} gives x = {_boxed(x)}.", _SRC + "algebra")


def series_sum(rng: random.Random, v: Voice) -> Trace:
    lo = rng.randint(1, 40)
    hi = lo + rng.randint(10, 150)
    n, total = hi - lo + 1, (lo + hi) * (hi - lo + 1) // 2
    prompt = f"What is the sum of all integers from {lo} to {hi}, inclusive?"
    t = [v.open(f"add up every integer from {lo} to {hi}"),
         "This is an arithmetic series, so I can use the formula: number of terms times the average of the first "
         "and last terms."]
    t += v.slip(f"The number of terms is {hi} - {lo} = {hi - lo}.",
                f"I forgot the +1 because both ends are included. The count is {hi} - {lo} + 1 = {n}.",
                f"The number of terms is {hi} - {lo} + 1 = {n}.")
    t.append(f"The average of the first and last terms is ({lo} + {hi}) / 2 = {number((lo + hi) / 2)}.")
    t.append(f"{v.then()} the sum is {n} × {number((lo + hi) / 2)} = {total}.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} Pairing terms: {lo} + {hi} = {lo + hi}, {lo + 1} + {hi - 1} = {lo + hi}, and so on. "
                 f"There are {n} terms, so {n} × {lo + hi} / 2 = {total}. {v.confirm()}")
    t.append(v.conclude(str(total)))
    answer = f"There are {n} terms with average {number((lo + hi) / 2)}, so the sum is {_boxed(total)}."
    return Trace(prompt, t, answer, _SRC + "series")


def gcd_problem(rng: random.Random, v: Voice) -> Trace:
    g = rng.choice([2, 3, 4, 6, 7, 8, 9, 12, 14, 15, 18, 21])
    p, q = rng.sample([2, 3, 5, 7, 11, 13, 17, 19, 23], 2)
    a, b = g * p * rng.choice([1, 2]), g * q
    if math.gcd(a, b) != g:
        a = g * p
    gcd = math.gcd(a, b)
    prompt = f"Find the greatest common divisor of {a} and {b}."
    t = [v.open(f"find gcd({a}, {b})"), "I'll use the Euclidean algorithm."]
    x, y = max(a, b), min(a, b)
    while y:
        t.append(f"{x} = {x // y} × {y} + {x % y}, so gcd({x}, {y}) = gcd({y}, {x % y}).")
        x, y = y, x % y
    t.append(f"The last nonzero remainder is {gcd}.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} {a} / {gcd} = {a // gcd} and {b} / {gcd} = {b // gcd}, and those two share no common "
                 f"factor. {v.confirm()}")
    if v.extra():
        lcm = a * b // gcd
        t.append(f"As a bonus, the least common multiple would be {a} × {b} / {gcd} = {lcm}, but the question only "
                 "asks for the gcd.")
    t.append(v.conclude(str(gcd)))
    return Trace(prompt, t, f"By the Euclidean algorithm, gcd({a}, {b}) = {_boxed(gcd)}.", _SRC + "number-theory")


def quadratic_roots(rng: random.Random, v: Voice) -> Trace:
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    while r1 + r2 == 0:  # a zero sum would make the sign slip below no slip at all
        r2 = rng.randint(-9, 9)
    s, p = r1 + r2, r1 * r2

    def term(coef, var):
        if coef == 0:
            return ""
        return f" {'+' if coef > 0 else '-'} {abs(coef) if abs(coef) != 1 or not var else ''}{var}"

    poly = f"x^2{term(-s, 'x')}{term(p, '')}"
    lo, hi = sorted((r1, r2))
    prompt = f"Find all real solutions of {poly} = 0."
    t = [v.open("solve a quadratic equation"),
         f"Let me try factoring. I need two numbers whose product is {p} and whose sum is {s}."]
    if v.chance(0.4):
        t.append(f"{v.hedge()} Let me list factor pairs of {p} and look for the right sum.")
    t += v.slip(f"Maybe {-lo} and {-hi}? Their product is {lo * hi} and their sum is {-s}.",
                f"The sum has the wrong sign. I need {lo} and {hi}: product {p}, sum {s}.",
                f"{lo} and {hi} work: {lo} × {hi} = {p} and {lo} + {hi} = {s}.")
    t.append(f"So the equation factors as (x - ({lo}))(x - ({hi})) = 0.")
    t += v.digressions()
    if v.extra():
        disc = s * s - 4 * p
        t.append(f"{v.check()} The discriminant is {s}^2 - 4 × {p} = {disc}, and sqrt({disc}) = {abs(hi - lo)}, "
                 f"so x = ({s} ± {abs(hi - lo)}) / 2 gives {lo} and {hi}. {v.confirm()}")
    roots = f"x = {lo}" if lo == hi else f"x = {lo} and x = {hi}"
    t.append(v.conclude(roots))
    return Trace(prompt, t, f"Factoring gives (x - ({lo}))(x - ({hi})) = 0, so {roots}.", _SRC + "algebra")


def dice_probability(rng: random.Random, v: Voice) -> Trace:
    target = rng.randint(3, 11)
    pairs = [(a, b) for a in range(1, 7) for b in range(1, 7) if a + b == target]
    g = math.gcd(len(pairs), 36)
    frac = f"{len(pairs) // g}/{36 // g}"
    prompt = f"Two fair six-sided dice are rolled. What is the probability that the sum is {target}?"
    t = [v.open(f"find the probability that two dice sum to {target}"),
         "There are 6 × 6 = 36 equally likely outcomes. Now I count the ones with the right sum."]
    listed = ", ".join(f"({a},{b})" for a, b in pairs)
    t += v.slip(f"The pairs are {listed}, but ({pairs[0][0]},{pairs[0][1]}) and ({pairs[-1][0]},{pairs[-1][1]}) "
                f"are the same roll, so maybe I should count it once?",
                f"No, the dice are distinct, so order matters. The pairs {listed} are all different outcomes: "
                f"{len(pairs)} of them.",
                f"The pairs are {listed}, which is {len(pairs)} outcomes.")
    t.append(f"{v.then()} the probability is {len(pairs)}/36 = {frac}.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} The counts for sums 2 through 12 go 1, 2, 3, 4, 5, 6, 5, 4, 3, 2, 1, and the count "
                 f"for {target} is {len(pairs)}. {v.confirm()}")
    t.append(v.conclude(frac))
    return Trace(prompt, t, f"{len(pairs)} of the 36 outcomes work, so the probability is {_boxed(frac)}.",
                 _SRC + "probability")


def right_triangle(rng: random.Random, v: Voice) -> Trace:
    a, b, c = rng.choice([(3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (9, 40, 41)])
    k = rng.randint(1, 4)
    a, b, c = a * k, b * k, c * k
    prompt = (f"A right triangle has legs of length {a} and {b}. What is the length of its hypotenuse, and what is "
              "its area?")
    t = [v.open("find the hypotenuse and the area of a right triangle"),
         f"By the Pythagorean theorem, c^2 = {a}^2 + {b}^2 = {a * a} + {b * b} = {c * c}."]
    t.append(f"So c = sqrt({c * c}). {c} × {c} = {c * c}, so c = {c}.")
    t += v.slip(f"The area is {a} × {b} = {a * b}.",
                f"I forgot to halve it. A triangle's area is half the base times the height: {a} × {b} / 2 = "
                f"{number(a * b / 2)}.",
                f"The area is half the product of the legs: {a} × {b} / 2 = {number(a * b / 2)}.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} {a}-{b}-{c} is {k} times a familiar Pythagorean triple. {v.confirm()}")
    t.append(v.conclude(f"hypotenuse {c}, area {number(a * b / 2)}"))
    return Trace(prompt, t, f"The hypotenuse is {_boxed(c)} and the area is {_boxed(number(a * b / 2))}.",
                 _SRC + "geometry")


def percent_change(rng: random.Random, v: Voice) -> Trace:
    price, up, down = rng.randrange(40, 400, 10), rng.choice([10, 20, 25, 30, 50]), rng.choice([10, 20, 25, 40])
    raised = price * (100 + up) / 100
    final = raised * (100 - down) / 100
    prompt = (f"A jacket costs ${price}. Its price is increased by {up}% and then the new price is decreased by "
              f"{down}%. What is the final price?")
    t = [v.open("apply two percentage changes one after the other")]
    t += v.slip(f"The net change is +{up}% - {down}% = {up - down}%, so the final price is "
                f"${number(price * (100 + up - down) / 100)}.",
                f"Percentages don't simply add, because the second change applies to the new price. Step by step: "
                f"${price} × {number(1 + up / 100)} = ${number(raised)}.",
                f"First the increase: ${price} × {number(1 + up / 100)} = ${number(raised)}.")
    t.append(f"{v.then()} the decrease: ${number(raised)} × {number(1 - down / 100)} = ${number(final)}.")
    t += v.digressions()
    if v.extra():
        factor = (100 + up) * (100 - down) / 10000
        t.append(f"{v.check()} The combined factor is {number(1 + up / 100)} × {number(1 - down / 100)} = "
                 f"{number(factor, 4)}, and ${price} × {number(factor, 4)} = ${number(final)}. {v.confirm()}")
    t.append(v.conclude(f"${number(final)}"))
    return Trace(prompt, t, f"The final price is ${price} × {number(1 + up / 100)} × {number(1 - down / 100)} = "
                 f"{_boxed('$' + number(final))}.", _SRC + "percent")


def power_remainder(rng: random.Random, v: Voice) -> Trace:
    base, mod, exp = rng.choice([2, 3, 7, 11, 13]), rng.choice([5, 7, 9, 10, 11, 13]), rng.randint(20, 120)
    if math.gcd(base, mod) != 1:
        mod = 7 if base != 7 else 9
    cycle, value = [], 1
    while True:
        value = value * base % mod
        if value in cycle:
            break
        cycle.append(value)
    period, result = len(cycle), pow(base, exp, mod)
    prompt = f"What is the remainder when {base}^{exp} is divided by {mod}?"
    t = [v.open(f"find {base}^{exp} mod {mod}"),
         f"{base}^{exp} is far too big to compute directly, so I'll look for a repeating pattern in the powers of "
         f"{base} modulo {mod}."]
    t.append(", ".join(f"{base}^{i + 1} ≡ {c}" for i, c in enumerate(cycle)) + f" (mod {mod}).")
    t.append(f"{v.hedge()} {base}^{period + 1} ≡ {cycle[0]} again, so the cycle length is {period}.")
    r = exp % period
    t += v.slip(f"{exp} divided by {period} leaves remainder {r}, so I read off entry {r} of my list: "
                f"{cycle[r]}.",
                f"The list starts at {base}^1, so entry {r} (counting from 0) is {base}^{r + 1}, not {base}^{r}. "
                f"Properly: {exp} = {period} × {exp // period} + {r}, and {base}^{period} ≡ 1, so {base}^{exp} ≡ "
                f"{base}^{r} ≡ {result}.",
                f"{exp} = {period} × {exp // period} + {r}, so {base}^{exp} ≡ {base}^{r} ≡ {result} (mod {mod}).")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} Computing step by step with repeated squaring also gives {result}. {v.confirm()}")
    t.append(v.conclude(str(result)))
    return Trace(prompt, t, f"The powers of {base} repeat every {period} steps modulo {mod}, so the remainder is "
                 f"{_boxed(result)}.", _SRC + "number-theory")


def divisor_count(rng: random.Random, v: Voice) -> Trace:
    exps = {p: rng.randint(0, e) for p, e in ((2, 5), (3, 3), (5, 2), (7, 1), (11, 1))}
    exps = {p: e for p, e in exps.items() if e} or {2: 3, 3: 1}
    n = math.prod(p ** e for p, e in exps.items())
    count = math.prod(e + 1 for e in exps.values())
    factored = " × ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in exps.items())
    prompt = f"How many positive divisors does {n} have?"
    t = [v.open(f"count the divisors of {n}"), f"First, the prime factorization: {n} = {factored}."]
    counted = " × ".join(f"({e} + 1)" for e in exps.values())
    t += v.slip(f"Multiplying the exponents gives {math.prod(exps.values())} divisors.",
                f"Each exponent can range from 0 up to its maximum, so it's the product of (exponent + 1): "
                f"{counted} = {count}.",
                f"The number of divisors is the product of (exponent + 1): {counted} = {count}.")
    t += v.digressions()
    if v.extra() and count <= 12:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        t.append(f"{v.check()} Listing them: {', '.join(map(str, divisors))}. That's {len(divisors)}. {v.confirm()}")
    t.append(v.conclude(str(count)))
    return Trace(prompt, t, f"Since {n} = {factored}, it has {counted} = {_boxed(count)} positive divisors.",
                 _SRC + "number-theory")


def missing_average(rng: random.Random, v: Voice) -> Trace:
    k, mean = rng.randint(4, 7), rng.randint(10, 60)
    known = [rng.randint(mean - 12, mean + 12) for _ in range(k - 1)]
    last = mean * k - sum(known)
    prompt = (f"The average of {k} numbers is {mean}. {k - 1} of them are {', '.join(map(str, known))}. "
              "What is the remaining number?")
    t = [v.open("find the missing number from an average"),
         f"If the average of {k} numbers is {mean}, their total is {k} × {mean} = {k * mean}."]
    t.append(f"The known numbers add up to {' + '.join(map(str, known))} = {sum(known)}.")
    t.append(f"{v.then()} the missing number is {k * mean} - {sum(known)} = {last}.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} ({sum(known)} + {last}) / {k} = {k * mean} / {k} = {mean}. {v.confirm()}")
    t.append(v.conclude(str(last)))
    return Trace(prompt, t, f"The total must be {k * mean}, so the remaining number is {_boxed(last)}.",
                 _SRC + "statistics")


def travel_time(rng: random.Random, v: Voice) -> Trace:
    speed1, speed2 = rng.choice([40, 45, 50, 60, 75, 80]), rng.choice([30, 40, 60, 90, 120])
    hours1, hours2 = rng.sample([0.5, 1, 1.5, 2, 2.5, 3], 2)  # unequal, so the naive mean of speeds is wrong
    d1, d2 = speed1 * hours1, speed2 * hours2
    avg = (d1 + d2) / (hours1 + hours2)
    prompt = (f"A car drives {number(hours1)} hours at {speed1} km/h and then {number(hours2)} hours at {speed2} "
              "km/h. What is its average speed for the whole trip?")
    t = [v.open("find the average speed over two legs of a trip")]
    t += v.slip(f"The average of {speed1} and {speed2} is {number((speed1 + speed2) / 2)} km/h.",
                "That only works if both legs take the same time. Average speed is total distance over total time.",
                "Average speed is total distance divided by total time.")
    t.append(f"Leg 1: {speed1} × {number(hours1)} = {number(d1)} km. Leg 2: {speed2} × {number(hours2)} = "
             f"{number(d2)} km.")
    t.append(f"{v.then()} the total distance is {number(d1 + d2)} km over {number(hours1 + hours2)} hours, which is "
             f"{number(avg)} km/h.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} The answer should lie between {min(speed1, speed2)} and {max(speed1, speed2)} km/h, "
                 f"and {number(avg)} does. {v.confirm()}")
    t.append(v.conclude(f"{number(avg)} km/h"))
    return Trace(prompt, t, f"Average speed = {number(d1 + d2)} km / {number(hours1 + hours2)} h = "
                 f"{_boxed(number(avg) + ' km/h')}.", _SRC + "rates")


GENERATORS = [shopping_change, linear_equation, series_sum, gcd_problem, quadratic_roots, dice_probability,
              right_triangle, percent_change, power_remainder, divisor_count, missing_average, travel_time]
