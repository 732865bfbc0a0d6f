"""A small multiple-choice cloze set built offline (written for this project): each item is a
context and four continuations, one right. Scored by the model's total log-probability of each
continuation; used to measure calibration methods (``benchmarks/llm.py``)."""
from __future__ import annotations

import torch

ITEMS = [  # (context, [right, wrong, wrong, wrong])
    ("The capital of France is", [" Paris", " Berlin", " Madrid", " Rome"]),
    ("The capital of Japan is", [" Tokyo", " Beijing", " Seoul", " Bangkok"]),
    ("Water freezes at a temperature of zero degrees", [" Celsius", " Kelvin", " meters", " grams"]),
    ("The largest planet in our solar system is", [" Jupiter", " Mars", " Venus", " Mercury"]),
    ("A week has seven", [" days", " months", " years", " hours"]),
    ("The opposite of hot is", [" cold", " loud", " tall", " fast"]),
    ("Bees make", [" honey", " milk", " silk", " bread"]),
    ("The sun rises in the", [" east", " west", " north", " south"]),
    ("A triangle has three", [" sides", " wheels", " legs", " colors"]),
    ("People use an umbrella when it", [" rains", " sleeps", " sings", " reads"]),
    ("The chemical symbol for gold is", [" Au", " Ag", " Fe", " Pb"]),
    ("Two plus two equals", [" four", " five", " three", " six"]),
    ("The first month of the year is", [" January", " March", " June", " October"]),
    ("A baby cat is called a", [" kitten", " puppy", " calf", " foal"]),
    ("The color of a clear sky on a sunny day is", [" blue", " green", " red", " purple"]),
    ("To write a letter you need a pen and", [" paper", " water", " sand", " salt"]),
    ("Fish live in", [" water", " trees", " deserts", " clouds"]),
    ("The author of Romeo and Juliet is William", [" Shakespeare", " Dickens", " Wordsworth", " Blake"]),
    ("Ice is the solid form of", [" water", " air", " iron", " wood"]),
    ("The planet we live on is called", [" Earth", " Saturn", " Pluto", " Neptune"]),
    ("A doctor works in a", [" hospital", " bakery", " garage", " library"]),
    ("The Great Wall is in", [" China", " Brazil", " Canada", " Egypt"]),
    ("Light travels faster than", [" sound", " thought", " time", " rest"]),
    ("The heart pumps", [" blood", " air", " food", " bones"]),
    ("Paris is located in the country of", [" France", " Italy", " Spain", " Germany"]),
    ("A year has twelve", [" months", " weeks", " days", " seasons"]),
    ("The tallest animal in the world is the", [" giraffe", " elephant", " horse", " mouse"]),
    ("Plants need sunlight to make their", [" food", " roots", " seeds", " shadows"]),
    ("The moon orbits the", [" Earth", " Sun", " Mars", " stars"]),
    ("We hear with our", [" ears", " eyes", " hands", " feet"]),
    ("The boiling point of water at sea level is one hundred degrees", [" Celsius", " Fahrenheit", " Kelvin", " meters"]),
    ("A person who flies an airplane is a", [" pilot", " farmer", " chef", " sailor"]),
    ("Snow is usually", [" white", " black", " orange", " green"]),
    ("The study of living things is called", [" biology", " geology", " astronomy", " grammar"]),
    ("The Pacific is the largest", [" ocean", " desert", " mountain", " forest"]),
    ("Cows give us", [" milk", " wool", " honey", " eggs"]),
    ("A clock shows the", [" time", " weather", " price", " distance"]),
    ("The instrument with black and white keys is the", [" piano", " guitar", " drum", " flute"]),
    ("Summer is followed by", [" autumn", " spring", " winter", " night"]),
    ("The number after nine is", [" ten", " eight", " seven", " eleven"]),
]


@torch.no_grad()
def accuracy(model, tok, items=ITEMS) -> float:
    """Fraction of items whose right continuation has the highest total log-probability."""
    right = 0
    for ctx, options in items:
        scores = []
        for opt in options:
            ids = tok(ctx + opt, return_tensors="pt").input_ids
            n_ctx = len(tok(ctx).input_ids)
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            tgt = ids[0, 1:]
            scores.append(logp[torch.arange(n_ctx - 1, len(tgt)), tgt[n_ctx - 1:]].sum().item())
        right += int(max(range(len(options)), key=scores.__getitem__) == 0)
    return right / len(items)
