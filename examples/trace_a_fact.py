"""Trace where a model recalls a fact, with any HookedTransformer.

    python examples/trace_a_fact.py

Uses the offline default model; swap in ``HookedTransformer.from_pretrained("gpt2-xl")``
(or any model you have) and nothing else changes.
"""

import rome_lens

model = rome_lens.load_model()

# 1. Where is "Paris" recalled?
trace = rome_lens.trace_fact(
    model,
    "The Eiffel Tower is located in the city of",
    subject="The Eiffel Tower",
    kinds=("resid", "mlp", "attn"),
    samples=10,  # noise draws per score
    window=10,  # MLP/attention layers restored together
)
for kind in trace.kinds:
    print(trace.peak(kind))
trace.plot("eiffel_trace.png")

# 2. Does the early-layer state at the subject work through the MLPs?
severed = rome_lens.trace_severed(
    model,
    "The Eiffel Tower is located in the city of",
    subject="The Eiffel Tower",
    severed="mlp",
    token=trace.peak("mlp").token,
)
print(severed.to_dataframe().head(10))

# 3. Average over facts the model knows (ROME's token groups, 95% intervals).
facts = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower"},
    {"prompt": "The Colosseum is located in the city of", "subject": "The Colosseum"},
]
average = rome_lens.average_causal_effects(model, facts, kinds=("mlp",), samples=5)
average.plot("average_effects.png")
print(average.to_dataframe().query("layer < 5"))
