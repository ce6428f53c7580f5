"""One GRPO run on fixed rollouts (every completion token scripted), in one process or under torchrun:
`python _grpo_dist.py MODEL OUT STEPS [DEEPSPEED]`. Every process saves its LoRA weights to OUT/params-RANK.pt; process 0 prints the summary."""
import json, os, sys
from pathlib import Path
import torch
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from vlm_nb.grpo import GRPOConfig, train_grpo, synthetic_tasks, rollout_from_trajectory, TokenRecorder, _trainable, dist_close
from vlm_nb.engine import ToolEngine, ForcedContinuation
from vlm_nb.batch import Request
from vlm_nb.models import load_model
from vlm_nb.tools import ToolRegistry
from vlm_nb.builtin_tools.crop_tool import CropTool
from vlm_nb.builtin_tools.identify_tool import IdentifyTool

if sys.argv[1] == 'advantages':           # `_grpo_dist.py advantages SCALE`: the advantages of [[1,0,0,0],[5,4,4,4]], group i on process i mod N
    from vlm_nb.grpo import _dist, step_advantages, _all_gather
    rank, world = _dist('cpu')
    groups = [[1., 0, 0, 0], [5., 4, 4, 4]]
    mine = [g for i, g in enumerate(groups) if i % world == rank]
    adv = step_advantages([x for g in mine for x in g], 4, [True]*4*len(mine), sys.argv[2], world)
    parts = _all_gather(adv.tolist(), world)
    if rank == 0: print(json.dumps({'world_size': world, 'advantages': [parts[i % world][4*(i//world):4*(i//world) + 4] for i in range(len(groups))]}))
    dist_close(); sys.exit(0)

model_dir, out, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ds = sys.argv[4] if len(sys.argv) > 4 else None
tasks, gallery = synthetic_tasks(2)
reg = ToolRegistry([CropTool(), IdentifyTool(gallery)])
writer, ad = load_model(model_dir, max_pixels=160*160)            # writes the scripted rollouts (its own logits never matter)
eng = ToolEngine(writer, ad, tools=reg)

def fixed_rollouts(task, G, seeds):
    "G completions that call Crop and answer right (even g) or wrong (odd g): the same tokens whatever the policy."
    recs = [TokenRecorder() for _ in range(G)]
    b = ', '.join(str(int(v)) for v in (task.boxes[0] if task.boxes else [0, 0, 50, 50]))
    reqs = [Request(task.images, task.question,
                    [ForcedContinuation(ad.tokenizer, f"<think>\nLet me look. <tool_call>Crop [{b}]</tool_call>Seen.</think>\n"
                                        f"<answer>{task.answer if g % 2 == 0 else 'no idea ' * (g + 1)}</answer>", 'eos'), recs[g]],
                    {'seed': seeds[g], 'max_new_tokens': 200}) for g in range(G)]
    return [rollout_from_trajectory(t, r.positions, 4) for t, r in zip(eng.run_batch(reqs), recs)]

cfg = GRPOConfig(model=model_dir, output_dir=str(out), steps=steps, prompts_per_step=3, num_generations=2, lr=1e-2,
                 adapter={'max_pixels': 160*160}, synthetic_images=2, save_every=1, deepspeed=ds)
policy, _ = load_model(model_dir, max_pixels=160*160)        # LoRA is added in place, so `policy` holds the trained weights
s = train_grpo(cfg, tasks=tasks, model=policy, adapter=ad, registry=reg, rollout_fn=fixed_rollouts)
torch.save({n: p.detach().clone() for n, p in policy.named_parameters() if 'lora_' in n}, out/f"params-{s['rank']}.pt")
if s['rank'] == 0: print(json.dumps(s))
dist_close()
