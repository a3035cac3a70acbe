"""Science trace templates: textbook physics and chemistry with units, computed from the row's RNG."""
from __future__ import annotations

import random

from .trace_voice import Trace, Voice, number

_SRC = "featurestore-demo/science-"


def kinematics(rng: random.Random, v: Voice) -> Trace:
    a, t_s = rng.choice([1.5, 2, 2.5, 3, 4, 5]), rng.randint(3, 12)
    dist, speed = 0.5 * a * t_s ** 2, a * t_s
    prompt = (f"A car starts from rest and accelerates uniformly at {number(a)} m/s² for {t_s} s. How far does it "
              "travel, and what is its final speed?")
    t = [v.open("use the constant-acceleration equations"), "Starting from rest means the initial velocity is 0."]
    t.append(f"Final speed: v = a·t = {number(a)} × {t_s} = {number(speed)} m/s.")
    t += v.slip(f"Distance: d = a·t² = {number(a)} × {t_s ** 2} = {number(a * t_s ** 2)} m.",
                f"I dropped the factor of one half. d = ½·a·t² = 0.5 × {number(a)} × {t_s ** 2} = {number(dist)} m.",
                f"Distance: d = ½·a·t² = 0.5 × {number(a)} × {t_s ** 2} = {number(dist)} m.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} The average speed is {number(speed / 2)} m/s over {t_s} s, which gives "
                 f"{number(dist)} m. {v.confirm()}")
    t.append(v.conclude(f"{number(dist)} m and {number(speed)} m/s"))
    return Trace(prompt, t, f"The car travels **{number(dist)} m** and reaches **{number(speed)} m/s**.",
                 _SRC + "physics")


def ohms_law(rng: random.Random, v: Voice) -> Trace:
    volts, ohms = rng.choice([3, 5, 6, 9, 12, 24, 120]), rng.choice([2, 4, 6, 8, 10, 12, 20, 40])
    amps, watts = volts / ohms, volts * volts / ohms
    prompt = f"A {ohms} Ω resistor is connected to a {volts} V battery. Find the current and the power dissipated."
    t = [v.open("apply Ohm's law and the power formula")]
    t += v.slip(f"I = V·R = {volts} × {ohms} = {volts * ohms} A.",
                f"That's upside down: Ohm's law is V = I·R, so I = V/R = {volts}/{ohms} = {number(amps, 3)} A.",
                f"Ohm's law: I = V/R = {volts}/{ohms} = {number(amps, 3)} A.")
    t.append(f"{v.then()} the power is P = V·I = {volts} × {number(amps, 3)} = {number(watts, 3)} W.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} P = V²/R = {volts * volts}/{ohms} = {number(watts, 3)} W. {v.confirm()}")
    t.append(v.conclude(f"{number(amps, 3)} A and {number(watts, 3)} W"))
    return Trace(prompt, t, f"The current is **{number(amps, 3)} A** and the power is **{number(watts, 3)} W**.",
                 _SRC + "physics")


_COMPOUNDS = [("water", "H2O", 18.02), ("carbon dioxide", "CO2", 44.01), ("sodium chloride", "NaCl", 58.44),
              ("glucose", "C6H12O6", 180.16), ("methane", "CH4", 16.04), ("ammonia", "NH3", 17.03)]


def moles(rng: random.Random, v: Voice) -> Trace:
    name, formula, molar = rng.choice(_COMPOUNDS)
    grams = rng.choice([9, 18, 22, 36, 50, 88, 100, 117, 250])
    mol = grams / molar
    prompt = f"How many moles are in {grams} g of {name} ({formula})? How many molecules is that?"
    t = [v.open(f"convert a mass of {formula} into moles and molecules"),
         f"The molar mass of {formula} is about {molar} g/mol."]
    t += v.slip(f"moles = {molar} / {grams} = {number(molar / grams, 3)} mol.",
                f"I divided the wrong way round. moles = mass / molar mass = {grams} / {molar} = "
                f"{number(mol, 3)} mol.",
                f"moles = mass / molar mass = {grams} / {molar} = {number(mol, 3)} mol.")
    count = mol * 6.022e23
    t.append(f"{v.then()} multiply by Avogadro's number: {number(mol, 3)} × 6.022 × 10^23 ≈ {count:.3e} "
             "molecules.")
    t += v.digressions()
    t.append(v.conclude(f"{number(mol, 3)} mol, about {count:.3e} molecules"))
    return Trace(prompt, t, f"{grams} g of {formula} is **{number(mol, 3)} mol**, about **{count:.3e} molecules**.",
                 _SRC + "chemistry")


def ideal_gas(rng: random.Random, v: Voice) -> Trace:
    n_mol, temp_c, vol = rng.choice([0.5, 1, 2, 3]), rng.choice([0, 20, 25, 37, 100]), rng.choice([10, 22.4, 24, 50])
    kelvin = temp_c + 273.15
    pressure = n_mol * 8.314 * kelvin / (vol / 1000)
    prompt = (f"What is the pressure of {number(n_mol)} mol of an ideal gas at {temp_c} °C in a {number(vol)} L "
              "container? Give the answer in kPa.")
    t = [v.open("use PV = nRT"), "I need SI units: temperature in kelvin and volume in cubic meters."]
    t += v.slip(f"T = {temp_c} K.",
                f"Celsius has to be converted: T = {temp_c} + 273.15 = {number(kelvin)} K.",
                f"T = {temp_c} + 273.15 = {number(kelvin)} K.")
    t.append(f"V = {number(vol)} L = {number(vol / 1000, 4)} m³.")
    t.append(f"{v.then()} P = nRT/V = {number(n_mol)} × 8.314 × {number(kelvin)} / {number(vol / 1000, 4)} ≈ "
             f"{pressure:.0f} Pa, which is about {number(pressure / 1000, 1)} kPa.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.hedge()} Is that reasonable? One mole at 0 °C in 22.4 L is about 101 kPa, so the scale is "
                 f"right. {v.confirm()}")
    t.append(v.conclude(f"about {number(pressure / 1000, 1)} kPa"))
    return Trace(prompt, t, f"P = nRT/V ≈ **{number(pressure / 1000, 1)} kPa**.", _SRC + "chemistry")


def temperature(rng: random.Random, v: Voice) -> Trace:
    celsius = rng.choice([-40, -10, 0, 15, 25, 37, 60, 100, 180])
    fahrenheit = celsius * 9 / 5 + 32
    prompt = f"Convert {celsius} °C to degrees Fahrenheit and to kelvin."
    t = [v.open("convert a Celsius temperature")]
    t += v.slip(f"F = (C + 32) × 9/5 = {number((celsius + 32) * 9 / 5)} °F.",
                f"I mixed up the order. F = C × 9/5 + 32 = {number(celsius * 9 / 5)} + 32 = {number(fahrenheit)} °F.",
                f"F = C × 9/5 + 32 = {number(celsius * 9 / 5)} + 32 = {number(fahrenheit)} °F.")
    t.append(f"K = C + 273.15 = {number(celsius + 273.15)} K.")
    t += v.digressions()
    if v.extra():
        t.append(f"{v.check()} Going back: ({number(fahrenheit)} - 32) × 5/9 = {celsius} °C. {v.confirm()}")
    t.append(v.conclude(f"{number(fahrenheit)} °F and {number(celsius + 273.15)} K"))
    return Trace(prompt, t, f"{celsius} °C = **{number(fahrenheit)} °F** = **{number(celsius + 273.15)} K**.",
                 _SRC + "physics")


GENERATORS = [kinematics, ohms_law, moles, ideal_gas, temperature]
