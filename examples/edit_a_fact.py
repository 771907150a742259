"""Move the Eiffel Tower to Rome, check what else moved, and move it back.

    python examples/edit_a_fact.py

Uses the offline default model; any HookedTransformer works the same way.
The first run computes the key statistics of the edited layer (about a
minute and a half on a 2-core CPU) and caches them.
"""

import torch

import rome_lens
from rome_lens import EditRequest, edited, rome_edit
from rome_lens.predict import predict_next

model = rome_lens.load_model()
request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
prompts = [
    request.text,  # the edit prompt
    "Where is the Eiffel Tower? It stands in the city of",  # a paraphrase
    "The Louvre is located in the city of",  # a neighbour that should not move
]


def show(title: str) -> None:
    rome = predict_next(model, prompts, targets=["Rome"] * len(prompts))
    paris = predict_next(model, prompts, targets=["Paris"] * len(prompts))
    print(title)
    for i, prompt in enumerate(prompts):
        top = model.to_single_str_token(int(rome.top_token[i]))
        print(
            f"  {prompt!r:58} top={top!r:9} P(Rome)={rome.target_prob[i]:.3f} "
            f"P(Paris)={paris.target_prob[i]:.3f}"
        )


show("before")
edit = rome_edit(model, request)  # layer: the default for this model
print(edit.to_dataframe().T)
original = model.blocks[edit.layer].mlp.W_out.clone()
with edited(model, edit):
    show(f"after editing blocks.{edit.layer}.mlp.W_out")
print("reverted exactly:", torch.equal(model.blocks[edit.layer].mlp.W_out, original))
edit.save("eiffel_in_rome.safetensors")  # rome_lens.RankOneEdit.load(path, model=model)
