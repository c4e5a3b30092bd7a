"""MFPO training on transformers' Trainer: a Trainer whose loss is MFPO over the three sequences of each row
(the collator in `data.py` builds them), computed by the prefix-shared forward (`prefix.py`: each image+prompt
prefix once, the answers on its KV cache) or one concatenated forward, and the easy-to-hard curriculum around it.

Checkpointing, resume, schedulers, mixed precision and multi-GPU (DDP, DeepSpeed ZeRO, FSDP through
`accelerate launch -m pipeline train CONFIG`) come from transformers / accelerate. What is ours: the
curriculum (one Trainer per bucket; with `schedule: curriculum` they share one learning-rate schedule and
carry the optimizer state across, so warm-up happens once), the stages' fingerprints and commit records
(`records.py`), complete-or-ignored checkpoints, and the reference check.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from mfpo.loss import LossWeights, mfpo_loss
from mfpo.models import ModelConfig, select_dtype
from mfpo.train import records
from mfpo.train.config import TrainConfig, policy_model_config
from mfpo.train.data import MFPOCollator, RowsDataset, bucket_indices, open_split, read_reference, splits
from mfpo.train.prefix import PrefixSharingUnsupported, resolve, shared_prefix_logps
from mfpo.vlm import answer_logps, load_vlm, reference_mismatch, reference_record
from pipeline.errors import PipelineError
from pipeline.storage import atomic_write, write_json

log = logging.getLogger("mfpo")


class ReferenceMismatch(records.TrainRefused):
    """The policy would not compute the dataset's reference log-probs at step 0."""


# ------------------------------------------------------------------------------------------ the Trainer
def _shifted(fn: Any, offset: int, step: int) -> float:
    return fn(step + offset)


class MFPOTrainer(Trainer):
    """A Trainer whose loss is MFPO; the three policy passes of a batch run as one prefix-shared forward (each
    image+prompt prefix once, `prefix.py`) or one concatenated forward.

    `span=(offset, total)`: this stage's steps are steps offset.. of one schedule over `total` steps (the
    whole curriculum), and `carry` is the optimizer state the previous stage ended with. `prefix_sharing`:
    train.prefix_sharing (`auto`, true or false), or what `prefix.resolve` made of it."""

    def __init__(
        self,
        *args: Any,
        weights: LossWeights,
        span: tuple[int, int] | None = None,
        carry: Path | None = None,
        prefix_sharing: bool | Literal["auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        from transformers.trainer_callback import PrinterCallback

        self.remove_callback(PrinterCallback)  # the step lines go through our log (_StepLog) instead
        self.weights = weights
        self.span = span
        self.carry = carry
        self.prefix_sharing = resolve(prefix_sharing, self.model, bool(self.args.activation_checkpointing))
        self._explicit = prefix_sharing is True  # a batch it cannot split is then an error, not a fallback
        self._metrics: dict[str, list[float]] = {}

    def policy_logps(self, model: Any, inputs: dict[str, Any], spans: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Summed answer log-probs of the batch's 3B sequences, in the collator's order, and the model output."""
        if self.prefix_sharing:
            try:
                return shared_prefix_logps(model, inputs, spans)
            except PrefixSharingUnsupported as err:
                if self._explicit:
                    raise
                log.warning("train: %s; the concatenated forward from here on", err)
                self.prefix_sharing = False
        outputs = model(**inputs)
        return answer_logps(outputs.logits, inputs["input_ids"], spans)[0], outputs

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        spans = inputs.pop("answer_spans")
        reference = inputs.pop("reference")
        has_image = inputs.pop("has_image")
        logps, outputs = self.policy_logps(model, inputs, spans)
        policy = logps.view(3, -1).T  # (B, 3): chosen | m, rejected | m, chosen | m'
        loss, metrics = mfpo_loss(policy, reference, has_image, self.weights)
        prefix = "" if model.training else "eval_"
        for k, v in metrics.items():
            self._metrics.setdefault(prefix + k, []).append(float(v))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        eval_call = any(k.startswith("eval_") for k in logs)
        mine = {k: v for k, v in self._metrics.items() if k.startswith("eval_") == eval_call}
        if mine:
            means = {k: sum(v) / len(v) for k, v in sorted(mine.items())}
            logs = {**logs, **_mean_over_ranks(means)}
            for k in mine:
                del self._metrics[k]
        super().log(logs, start_time)

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer(model)
        if self.carry is not None and self.carry.exists():
            # The state the previous curriculum stage ended with (a checkpoint, when resuming, replaces it).
            optimizer.load_state_dict(torch.load(self.carry, map_location="cpu", weights_only=True))
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.span is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from torch.optim.lr_scheduler import LambdaLR
        from transformers import get_scheduler

        optimizer = optimizer or self.optimizer
        offset, total = self.span
        schedule = get_scheduler(
            self.args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=self.args.get_warmup_steps(total),
            num_training_steps=total,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        if not isinstance(schedule, LambdaLR):
            raise PipelineError(
                f"train.schedule: curriculum runs one {self.args.lr_scheduler_type} schedule across the stages, "
                "which needs a step-based scheduler; use train.schedule: stage"
            )
        # The same curve, entered `offset` steps in.
        schedule.lr_lambdas = [partial(_shifted, fn, offset) for fn in schedule.lr_lambdas]
        for group, fn in zip(optimizer.param_groups, schedule.lr_lambdas, strict=True):
            group["lr"] = group["initial_lr"] * fn(0)
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
        self.lr_scheduler = schedule
        self._created_lr_scheduler = True
        return schedule


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the data-parallel ranks (every rank computes its own batches' metrics)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.cpu().tolist(), strict=True))


class _Commit(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it: resume trusts only marked ones.
    With an object-store output, `publish` then uploads it (the marker last)."""

    def __init__(self, publish: Callable[[], None] | None) -> None:
        self.publish = publish

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            records.commit_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            if self.publish is not None:
                self.publish()


class _StepLog(TrainerCallback):
    """Every logged step's metrics (all loss terms, rewards, margins, accuracies, learning rate) in train.log."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if state.is_world_process_zero and logs:
            shown = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            log.info("train %s step %d/%d: %s", self.stage, state.global_step, state.max_steps, shown)


# ------------------------------------------------------------------------------------------ the policy
def device_and_dtype(model_cfg: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """The numeric regime the score stage uses for the same settings: weights in this dtype, no autocast."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, select_dtype(device, model_cfg.precision)


def check_reference(cfg: TrainConfig, dataset_dir: Path) -> None:
    """Refuse (or warn, train.reference_check: warn) when the policy's starting point is not the model, dtype,
    chat template and system prompt the dataset's reference log-probs were computed with."""
    from transformers import AutoProcessor

    reference = read_reference(dataset_dir)
    model_cfg = policy_model_config(cfg, reference)
    if reference is None:
        log.warning("train: the dataset does not record its reference model; the reference check is skipped")
        return
    _, dtype = device_and_dtype(model_cfg)
    processor = AutoProcessor.from_pretrained(model_cfg.model, **model_cfg.pretrained_kwargs())
    policy = reference_record(model_cfg, processor, dtype, cfg.system_prompt)
    differs = reference_mismatch(reference, policy)
    if not differs:
        return
    message = (
        f"the policy's starting point does not match the dataset's reference model ({'; '.join(differs)}); "
        f"train from the score stage's model and settings ({reference['model']}, system_prompt, precision), "
        "or set train.reference_check: warn"
    )
    if cfg.reference_check == "error":
        raise ReferenceMismatch(message)
    log.warning("train: %s", message)


def build_policy(cfg: TrainConfig, model_cfg: ModelConfig) -> tuple[Any, Any, torch.dtype]:
    # The score stage's regime: weights load in its dtype (bf16 on CUDA by default) and run without autocast,
    # so step 0 reproduces the stored reference log-probs.
    _, dtype = device_and_dtype(model_cfg)
    model, processor = load_vlm(model_cfg, "cpu", dtype)
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            bias="none",
        )
        model = get_peft_model(model, lora)
    elif cfg.freeze_vision_tower:
        for name, param in model.named_parameters():
            if "vision_tower" in name or "vision_model" in name or name.startswith("visual."):
                param.requires_grad_(False)
    return model, processor, dtype


def training_arguments(cfg: TrainConfig, out: Path, seed: int, epochs: float, has_eval: bool) -> TrainingArguments:
    kwargs: dict[str, Any] = {
        "output_dir": str(out),
        "num_train_epochs": epochs,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "seed": seed,
        "data_seed": seed,
        "bf16": False,  # no autocast: the weights' own dtype, as in the score stage
        "fp16": False,
        "activation_checkpointing": cfg.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "remove_unused_columns": False,
        "ddp_find_unused_parameters": False,  # every trainable tensor takes part in each MFPO forward
        "report_to": cfg.report_to or "none",
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": True,  # progress goes to the log, one line per logged step
        **{k: v for k, v in cfg.extra_arguments.items() if k != "push_to_hub"},  # we push the final model
    }
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    return TrainingArguments(**kwargs)


# ------------------------------------------------------------------------------------------ the curriculum
def world() -> dict[str, Any]:
    return {
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def is_lead() -> bool:
    """Whether this process writes shared files: always outside distributed training, else rank 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return records.lead()  # before the process group exists: the launcher's RANK


def train(
    cfg: TrainConfig,
    dataset_dir: Path,
    out: Path,
    seed: int,
    plans: list[records.StagePlan],
    publish: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the curriculum into `out` (prepared by `records.prepare_output`); finished stages whose fingerprint
    matches are loaded, a started one continues from its last complete checkpoint. Returns the summary.
    `publish` (rank 0, object-store outputs) is called after each record and checkpoint is written."""
    from accelerate import PartialState
    from transformers import set_seed

    PartialState().wait_for_everyone()  # rank 0 may still be preparing the folder
    # transformers 5 calls its own deprecated alias inside Trainer.train; nothing a user could change.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    reference = read_reference(dataset_dir)
    model_cfg = policy_model_config(cfg, reference)
    eval_wanted = str(cfg.extra_arguments.get("eval_strategy", "no")) not in ("no", "IntervalStrategy.NO")
    if eval_wanted and "test" not in splits(dataset_dir):
        raise records.TrainRefused(
            "train.eval_strategy needs a held-out split, and the dataset has none (data/test-*.parquet)"
        )
    ds = open_split(dataset_dir, "train", out / "_cache")
    eval_ds = open_split(dataset_dir, "test", out / "_cache") if eval_wanted else None
    buckets = dict(bucket_indices(ds, list(cfg.curriculum.order), cfg.curriculum.all_at_once))
    set_seed(seed)  # the adapters' random initialisation too: the same seed gives the same run
    model, processor, dtype = build_policy(cfg, model_cfg)
    # Decided once, before any stage trains: `true` on a model that cannot do it stops here, in one line.
    prefix_sharing = resolve(cfg.prefix_sharing, model, cfg.gradient_checkpointing)
    if prefix_sharing:
        log.info("train: prefix-shared forward (each image+prompt prefix once, the answers on its KV cache)")
    collator = MFPOCollator(processor, cfg.system_prompt, dtype)
    weights = LossWeights(cfg.loss.beta, cfg.loss.eta, cfg.loss.w_text, cfg.loss.w_image, cfg.loss.w_margin)
    here = world()
    lead = is_lead()

    overrides: dict[str, list[float | None]] = {}
    trainers: list[MFPOTrainer | None] = []
    for plan in plans:
        rows = buckets[plan.bucket]
        if not rows:
            trainers.append(None)
            continue
        args = training_arguments(cfg, out / plan.name, seed, cfg.curriculum.epochs_per_stage, eval_ds is not None)
        trainers.append(
            MFPOTrainer(
                model=model,
                args=args,
                train_dataset=RowsDataset(ds, rows, overrides),
                eval_dataset=RowsDataset(eval_ds, list(range(len(eval_ds)))) if eval_ds is not None else None,
                data_collator=collator,
                weights=weights,
                prefix_sharing=cfg.prefix_sharing if prefix_sharing else False,  # auto / true: as asked
                callbacks=[_Commit(publish if lead else None), _StepLog(plan.name)],
            )
        )
    steps = [t.set_initial_training_values(t.args, t.get_train_dataloader())[-1] if t else 0 for t in trainers]
    total = sum(steps)

    summary: dict[str, Any] = {"stages": []}
    sample_ids = ds.data.column("sample_id").to_pylist()
    carry: Path | None = None  # the optimizer state of the last stage that trained (schedule: curriculum)
    for k, (plan, trainer) in enumerate(zip(plans, trainers, strict=True)):
        folder = out / plan.name
        state, _ = records.stage_state(out, plan, here)
        if state == "done":
            _load_weights(model, folder / "final", cfg)
            summary["stages"].append(json.loads((folder / "stage.json").read_text()))
            log.info("train: %s already done (fingerprint %s)", plan.name, plan.fingerprint)
            carry = folder / "optimizer.pt" if (folder / "optimizer.pt").exists() else carry
            continue
        record: dict[str, Any] = {
            "stage": k,
            "bucket": plan.bucket,
            "fingerprint": plan.fingerprint,
            "inputs": plan.inputs,
            **here,
            "dtype": str(dtype).removeprefix("torch."),
        }
        if lead:
            write_json(folder / "_started.json", record)
            _call(publish)
        if trainer is None:
            log.warning("train: bucket %s has no rows; nothing to train in %s", plan.bucket, plan.name)
            record.update(rows=0, sample_ids=[], steps=0, train_loss=float("nan"), last_metrics={})
        else:
            if cfg.curriculum.refresh_reference and k > 0:
                _refresh(trainer, collator, trainer.train_dataset, folder / "reference.json", lead)
            if cfg.schedule == "curriculum":
                trainer.span = (sum(steps[:k]), total)
                trainer.carry = carry
            checkpoints = records.committed_checkpoints(folder)
            log.info(
                "train: %s, %d rows, %d steps%s",
                plan.name,
                len(trainer.train_dataset),
                steps[k],
                f", resuming from {checkpoints[-1].name}" if checkpoints else "",
            )
            result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
            trainer.save_model(str(folder / "final"))  # (rank 0 only, under DDP)
            history = [h for h in trainer.state.log_history if "loss/text" in h]
            record.update(
                rows=len(trainer.train_dataset),
                sample_ids=[sample_ids[i] for i in trainer.train_dataset.indices],
                steps=trainer.state.global_step,
                train_loss=result.training_loss,
                last_metrics=history[-1] if history else {},
                learning_rates=[h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h],
            )
            if lead:
                processor.save_pretrained(folder / "final")
                if cfg.schedule == "curriculum":
                    state_dict = trainer.optimizer.state_dict()
                    atomic_write(folder / "optimizer.pt", lambda tmp, sd=state_dict: torch.save(sd, tmp))
            carry = folder / "optimizer.pt"
        if lead:
            write_json(folder / "stage.json", record)  # the commit point of the stage
            _call(publish)
        summary["stages"].append(record)
    if lead:
        final = out / "final"
        _unwrap(model).save_pretrained(final)
        processor.save_pretrained(final)
    return summary


def _call(publish: Callable[[], None] | None) -> None:
    if publish is not None:
        publish()


def _refresh(trainer: MFPOTrainer, collator: MFPOCollator, subset: RowsDataset, saved: Path, lead: bool) -> None:
    """The next bucket's reference log-probs under the current policy (curriculum.refresh_reference), saved
    so that a resumed stage uses the ones computed at its start, not the policy's later state. They come from
    the forward the policy trains with, so that the stage's first rewards are 0 up to the same rounding."""
    if saved.exists():
        subset.overrides.update(json.loads(saved.read_text()))
        return
    model = trainer.model
    model.eval()
    device = next(model.parameters()).device
    computed: dict[str, list[float | None]] = {}
    with torch.inference_mode():
        for start in range(0, len(subset), 8):
            rows = [subset[i] for i in range(start, min(start + 8, len(subset)))]
            batch = collator(rows)
            spans = batch.pop("answer_spans")
            batch.pop("reference")
            has_image = batch.pop("has_image")
            batch = {k: v.to(device) for k, v in batch.items()}
            logps = trainer.policy_logps(model, batch, spans)[0].view(3, -1).T.double()
            for r, lp, keep in zip(rows, logps.cpu().tolist(), has_image.tolist(), strict=True):
                computed[r["sample_id"]] = [lp[0], lp[1], lp[2] if keep else None]
    model.train()
    subset.overrides.update(computed)
    if lead:
        write_json(saved, computed)


def push_model(cfg: TrainConfig, folder: Path) -> str:
    """`push_to_hub: true`: the final model folder to `hub_model_id` (one commit, huggingface_hub)."""
    from huggingface_hub import HfApi

    extra = cfg.extra_arguments
    repo_id = extra.get("hub_model_id")
    if not repo_id:
        raise PipelineError("train.push_to_hub needs train.hub_model_id (ORG/NAME)")
    api = HfApi(token=extra.get("hub_token"))
    api.create_repo(repo_id, private=bool(extra.get("hub_private_repo")), exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload MFPO-trained model")
    return info.commit_url


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _load_weights(model: Any, folder: Path, cfg: TrainConfig) -> None:
    """Put a finished stage's weights back into the model (resume after that stage)."""
    from safetensors.torch import load_file

    if cfg.finetune == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    else:
        state: dict[str, Any] = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        model.load_state_dict(state, strict=False)
