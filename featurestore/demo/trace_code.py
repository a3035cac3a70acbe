"""Code trace templates: small Python tasks, reasoned about, traced on an example whose output is computed here."""
from __future__ import annotations

import random

from .trace_voice import Trace, Voice

_SRC = "featurestore-demo/code-"


def _block(code: str) -> str:
    return f"```python\n{code}\n```"


def fibonacci(rng: random.Random, v: Voice) -> Trace:
    name, n = rng.choice(["fib", "fibonacci", "nth_fibonacci"]), rng.randint(6, 25)
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    code = f"def {name}(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"
    prompt = f"Write a Python function `{name}(n)` that returns the n-th Fibonacci number, with {name}(0) = 0 and " \
             f"{name}(1) = 1. It should be fast for n up to 10^5."
    t = [v.open("write a Fibonacci function"),
         "The obvious recursive version calls itself twice per step, so it's exponential. That's too slow for "
         "large n."]
    if v.extra():
        t.append(f"{v.hedge()} I could memoize the recursion, but Python's recursion limit would break for n = "
                 "10^5. An iterative loop is better.")
    t.append("Keep two variables a and b for consecutive Fibonacci numbers and shift them n times.")
    t += v.slip("After the loop I return b.",
                f"If n = 0 the loop doesn't run and b = 1, but {name}(0) should be 0. So return a instead.",
                "After n shifts, a holds F(n), so return a.")
    t += v.digressions()
    if v.extra():
        t.append(f"Let me trace n = 5: (a, b) goes (0,1) → (1,1) → (1,2) → (2,3) → (3,5) → (5,8), so it returns 5. "
                 f"{v.confirm()}")
    t.append(f"For n = {n} it should give {a}.")
    return Trace(prompt, t, f"{_block(code)}\n\nThis runs in O(n) time and O(1) space; for example {name}({n}) "
                 f"returns {a}.", _SRC + "basics", rng.randint(1, 3))


def palindrome(rng: random.Random, v: Voice) -> Trace:
    name = rng.choice(["is_palindrome", "check_palindrome"])
    sample = rng.choice(["A man, a plan, a canal: Panama", "No lemon, no melon", "race a car", "Was it a cat I saw?",
                         "hello world", "Step on no pets"])
    cleaned = "".join(ch.lower() for ch in sample if ch.isalnum())
    result = cleaned == cleaned[::-1]
    code = (f"def {name}(s):\n    cleaned = [ch.lower() for ch in s if ch.isalnum()]\n"
            "    return cleaned == cleaned[::-1]")
    prompt = (f"Write a function `{name}(s)` that returns True if the string s is a palindrome when only letters "
              "and digits are considered, ignoring case.")
    t = [v.open("check whether a string reads the same forwards and backwards"),
         "First I need to drop everything that isn't a letter or digit, and lowercase the rest."]
    t += v.slip("Then compare s with s[::-1].",
                "Comparing the raw string is wrong because of the spaces and punctuation. I have to compare the "
                "cleaned version.",
                "Then compare the cleaned sequence with its reverse.")
    if v.extra():
        t.append("An alternative is two pointers moving inward, which avoids building a copy. But the slicing "
                 "version is clearer, and the copy is only O(n).")
    t += v.digressions()
    t.append(f"Test: \"{sample}\" becomes \"{cleaned}\", and its reverse is \"{cleaned[::-1]}\", so the result is "
             f"{result}.")
    return Trace(prompt, t, f"{_block(code)}\n\nFor example, {name}(\"{sample}\") returns {result}.",
                 _SRC + "strings", rng.randint(1, 3))


def count_vowels(rng: random.Random, v: Voice) -> Trace:
    name = rng.choice(["count_vowels", "vowel_count", "num_vowels"])
    sample = rng.choice(["Programming is fun", "OpenAI Gym", "The quick brown fox", "rhythm", "Education",
                         "Queueing theory"])
    count = sum(ch in "aeiouAEIOU" for ch in sample)
    code = f"def {name}(text):\n    return sum(1 for ch in text.lower() if ch in \"aeiou\")"
    prompt = f"Implement `{name}(text)` that returns the number of vowels (a, e, i, o, u, any case) in text."
    t = [v.open("count the vowels in a string")]
    t += v.slip("Loop over the characters and check ch in \"aeiou\".",
                "That misses uppercase vowels like 'E' or 'O'. I should lowercase the text first.",
                "Lowercase the text, then count the characters that are in \"aeiou\".")
    if v.extra():
        t.append(f"{v.hedge()} Should 'y' count? The problem lists only a, e, i, o, u, so no.")
    t += v.digressions()
    t.append(f"Check: \"{sample}\" has {count} vowels.")
    return Trace(prompt, t, f"{_block(code)}\n\n{name}(\"{sample}\") returns {count}.", _SRC + "strings",
                 rng.randint(1, 2))


def two_sum(rng: random.Random, v: Voice) -> Trace:
    nums = rng.sample(range(1, 60), rng.randint(5, 8))
    i, j = sorted(rng.sample(range(len(nums)), 2))
    target = nums[i] + nums[j]
    seen, found = {}, None
    for k, x in enumerate(nums):
        if target - x in seen:
            found = (seen[target - x], k)
            break
        seen[x] = k
    code = ("def two_sum(nums, target):\n    seen = {}\n    for i, x in enumerate(nums):\n"
            "        if target - x in seen:\n            return [seen[target - x], i]\n        seen[x] = i\n"
            "    return None")
    prompt = ("Given a list of integers nums and an integer target, return the indices of two numbers that add up "
              f"to target. Example: nums = {nums}, target = {target}.")
    t = [v.open("find two indices whose values add up to the target"),
         "The brute-force way checks every pair, which is O(n^2). A dictionary from value to index makes it O(n)."]
    t.append("For each number x, check whether target - x was already seen; if so, return both indices.")
    t += v.slip("I'll first put every number in the dictionary and then look up target - x.",
                "That could pair an element with itself when target = 2x. Checking before inserting avoids that.",
                "Checking before inserting means an element is never paired with itself.")
    t += v.digressions()
    if v.extra():
        t.append(f"Trace the example: we look for {target} - x at each step and find it at indices {found}. "
                 f"{nums[found[0]]} + {nums[found[1]]} = {target}. {v.confirm()}")
    return Trace(prompt, t, f"{_block(code)}\n\nFor the example it returns {list(found)}.", _SRC + "arrays",
                 rng.randint(2, 4))


def running_max(rng: random.Random, v: Voice) -> Trace:
    name = rng.choice(["find_max", "largest", "max_value"])
    nums = [rng.randint(-50, 99) for _ in range(rng.randint(5, 9))]
    code = (f"def {name}(nums):\n    if not nums:\n        raise ValueError(\"empty list\")\n    best = nums[0]\n"
            "    for x in nums[1:]:\n        if x > best:\n            best = x\n    return best")
    prompt = f"Write `{name}(nums)` that returns the largest element of a list without using the built-in max()."
    t = [v.open("find the maximum of a list by hand")]
    t += v.slip("Start with best = 0 and update it whenever a larger element appears.",
                "If every number is negative, best stays 0, which isn't even in the list. Start from nums[0].",
                "Start with best = nums[0] so that negative lists work too.")
    t.append("An empty list has no maximum, so raise ValueError, the same as max() does.")
    t += v.digressions()
    t.append(f"Test with {nums}: the largest is {max(nums)}.")
    return Trace(prompt, t, f"{_block(code)}\n\n{name}({nums}) returns {max(nums)}.", _SRC + "arrays",
                 rng.randint(1, 2))


def dedupe(rng: random.Random, v: Voice) -> Trace:
    name = rng.choice(["dedupe", "unique_in_order", "remove_duplicates"])
    items = [rng.randint(1, 9) for _ in range(rng.randint(6, 12))]
    out = list(dict.fromkeys(items))
    code = (f"def {name}(items):\n    seen = set()\n    result = []\n    for x in items:\n        if x not in seen:\n"
            "            seen.add(x)\n            result.append(x)\n    return result")
    prompt = f"Write `{name}(items)` that removes duplicates from a list while keeping the first occurrence order."
    t = [v.open("remove duplicates but keep the order")]
    t += v.slip("Just return list(set(items)).",
                "A set doesn't preserve order, so the output could be shuffled. I need a seen-set plus a list.",
                "Use a set for what has been seen and a list for the output, so the order is preserved.")
    if v.extra():
        t.append("In modern Python, list(dict.fromkeys(items)) also works, since dicts keep insertion order. The "
                 "explicit loop is easier to read for beginners, though.")
    t += v.digressions()
    t.append(f"Example: {items} → {out}.")
    return Trace(prompt, t, f"{_block(code)}\n\nFor {items} it returns {out}.", _SRC + "arrays", rng.randint(1, 3))


def binary_search(rng: random.Random, v: Voice) -> Trace:
    nums = sorted(rng.sample(range(0, 100), rng.randint(7, 12)))
    target = rng.choice(nums + [101])
    index = nums.index(target) if target in nums else -1
    code = ("def binary_search(nums, target):\n    lo, hi = 0, len(nums) - 1\n    while lo <= hi:\n"
            "        mid = (lo + hi) // 2\n        if nums[mid] == target:\n            return mid\n"
            "        if nums[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n"
            "    return -1")
    prompt = (f"Implement binary search: return the index of target in the sorted list nums, or -1 if it is absent. "
              f"Example: nums = {nums}, target = {target}.")
    t = [v.open("write an iterative binary search"), "Keep a window [lo, hi] and halve it each step."]
    t += v.slip("The loop condition is while lo < hi.",
                "With lo < hi a one-element window is never checked, so the loop has to be while lo <= hi.",
                "Loop while lo <= hi, so that a one-element window is still checked.")
    t.append("Move lo to mid + 1 or hi to mid - 1; otherwise the loop can get stuck.")
    t += v.digressions()
    if v.extra():
        lo, hi, steps = 0, len(nums) - 1, []
        while lo <= hi:
            mid = (lo + hi) // 2
            steps.append(f"lo={lo}, hi={hi}, mid={mid} (nums[mid]={nums[mid]})")
            if nums[mid] == target:
                break
            lo, hi = (mid + 1, hi) if nums[mid] < target else (lo, mid - 1)
        t.append("Tracing the example: " + "; ".join(steps) + f". Result: {index}.")
    return Trace(prompt, t, f"{_block(code)}\n\nFor the example it returns {index}.", _SRC + "search",
                 rng.randint(2, 4))


GENERATORS = [fibonacci, palindrome, count_vowels, two_sum, running_max, dedupe, binary_search]
