"""The trainer's own evaluation of a checkpoint, for the export tests (run as a subprocess):

    python -m tests.serving.reference TASK DATA_DIR CKPT RUN_DIR OUT.pt [GIN_PARAM ...]
    python -m tests.serving.reference sid DATA_DIR CKPT RUN_DIR OUT.pt CODES_DIR [GIN_PARAM ...]


Loads the checkpoint into a Trainer (one process) and writes, per evaluation sample in user
order: retrieval top-10 ids and scores (RetrievalRecommender.evaluate) and the trainer's
HR@10 (hstu.training.evaluate); ranking the candidates' logits (the model's forward);
``sid``: configs/ml-100k_sid_retrieval.gin's model, per test sample its top-10 by beam search
(history excluded) and their scores, and the trainer's test HR@10.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(task: str, data: str, ckpt: str, run_dir: str, out: str, *params: str) -> None:
    from hstu.config import load_config
    from hstu.training.distributed import destroy_distributed, init_distributed, set_seed
    from hstu.training.evaluate import evaluate
    from hstu.training.trainer import Trainer

    sid = task == "sid"  # params: the codes folder
    config = "ml-100k_sid_retrieval.gin" if sid else f"debug_{task}.gin"
    if sid:
        task, params = "retrieval", (f'NetworkArgs.sid_codes="{params[0]}"', *params[1:])
    cfg = load_config(
        os.path.join(ROOT, "configs", config),
        [f'DatasetArgs.dataset_path="{data}"', f'TrainerArgs.ckpt_load_dir="{ckpt}"',
         f'TrainerArgs.run_dir="{run_dir}"', *params],
        task=task, world_size=1,
    )
    env = init_distributed(1)
    try:
        set_seed(cfg.trainer.seed)
        trainer = Trainer(cfg, env, run_dir, "")
        # the semantic-id preset holds out validation: hstu.recommend's last event is the test's
        model = trainer.model
        loader = trainer.built.test_loader if sid else trainer.built.eval_loader
        model.eval()
        torch.set_grad_enabled(False)
        users = loader.samples.user
        result: dict = {"users": torch.from_numpy(users)}
        ids, scores, logits = [], [], []
        for batch in loader:
            keep = batch.sample_mask
            if sid:
                dense = model.dense_module
                queries, history, seg = dense.last_states(batch, model.sparse(batch.features))
                top = dense.recommend(queries, 10, (seg, history))
                top_ids, top_scores = top.items, top.scores
            elif task == "retrieval":
                r = model.evaluate(batch, top_k=10)
                top_ids, top_scores = r.top_ids, r.top_scores
            else:
                b = model.prepare(batch)
                _, (lg, _) = model(b)
                logits.append(lg[torch.repeat_interleave(keep, b.num_candidates)])
                continue
            if keep is None:
                keep = torch.ones(top_ids.shape[0], dtype=torch.bool)
            ids.append(top_ids[keep])
            scores.append(top_scores[keep])
        if task == "retrieval":
            result.update(top_ids=torch.cat(ids), top_scores=torch.cat(scores))
            result["metrics"] = evaluate(model, loader, cfg, env, None)
        else:
            result["logits"] = torch.cat(logits)
        torch.save(result, out)
        trainer.close()
        trainer = model = None  # free the process groups before their teardown
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
