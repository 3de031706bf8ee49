"""`fmnist-vit`: the RMM paper's vision setting in miniature, built offline on a CPU.

- Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx files under
  /usr/share/datasets/fashion-mnist, or $MERGECORE_FASHION_MNIST) and scikit-learn's bundled
  8x8 ``load_digits``, upsampled to 20x20 and padded to 28x28 like MNIST.
- Splits: Fashion-MNIST train rows [0, 50000) train everything, rows [50000, 60000) are the
  validation split (tasks-val.yml), the 10000 test rows are the test split (tasks.yml). Digits
  are split once with the build seed: 400 test, 300 validation, the rest (1097) train.
- Base: a small ViTForImageClassification pretrained by **rotation prediction** (4-way:
  0/90/180/270 degrees) on the training images of both data sets -- an objective disjoint from
  every expert task (no class label is ever used), as the RMM setting asks for a generic
  pretrained body.
- Experts: each fine-tuned from the base (all weights; classifier re-initialised) on one task:
  three disjoint class subsets of Fashion-MNIST (tops / footwear / other) and the ten digits.
  Every checkpoint keeps the same 10-output head, so the family merges with the engine; a task
  is scored with its own expert's head on the merged body (``head_from``).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from mergecore.errors import MergeError
from mergecore.eval.data import read_idx
from mergecore.events import CancelToken
from mergecore.families.base import FamilyBuilder, FamilyProgressCallback, StageReporter, override_dataclass
from mergecore.families import training
from mergecore.models import ImagePrep

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_TRAIN_ROWS = 50_000  # rows [50000, 60000) of the train file are the validation split
DIGITS_TEST, DIGITS_VAL = 400, 300
# Fashion-MNIST pixel statistics (after /255); used for both data sets
IMAGE_MEAN, IMAGE_STD = 0.2860, 0.3530


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    dataset: str  # "fashion" or "digits"
    classes: tuple[int, ...]


DEFAULT_EXPERTS: tuple[ExpertSpec, ...] = (
    ExpertSpec("fmnist_tops", "fashion", (0, 2, 4, 6)),   # T-shirt/top, Pullover, Coat, Shirt
    ExpertSpec("fmnist_footwear", "fashion", (5, 7, 9)),  # Sandal, Sneaker, Ankle boot
    ExpertSpec("fmnist_other", "fashion", (1, 3, 8)),     # Trouser, Dress, Bag
    ExpertSpec("digits", "digits", tuple(range(10))),
)


@dataclass
class FmnistVitConfig:
    # model: ViT on 28x28 grayscale, patch 4 -> 49 patches + [CLS]
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 192
    patch_size: int = 4
    num_labels: int = 10
    # std of the truncated-normal init; transformers' 0.02 left this small ViT stuck on a loss
    # plateau for hundreds of steps, ~1/sqrt(hidden) (LeCun-style) trains at once
    initializer_range: float = 0.1
    # training
    batch_size: int = 128
    pretrain_steps: int = 1500
    pretrain_lr: float = 1e-3
    expert_steps: int = 500
    expert_lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    # data sizes (None: everything)
    train_limit: Optional[int] = None  # training images taken from each pool (Fashion-MNIST, digits)
    eval_limit: Optional[int] = None  # rows of each test / validation file the tasks read
    # linear probes on the frozen base (how good the base is before fine-tuning); 0 steps: skip
    probe_steps: int = 300
    probe_train: int = 5000
    seed: int = 0
    experts: tuple[ExpertSpec, ...] = DEFAULT_EXPERTS
    fashion_dir: Optional[str] = None
    eval_batch_size: int = 256

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["experts"] = [{"name": e.name, "dataset": e.dataset, "classes": list(e.classes)} for e in self.experts]
        return d


# FULL: about 7 minutes on 2 free cores (pretraining ~3.5 min, each expert ~1 min, evaluation
# ~0.5 min); a shared machine can double that.
FULL = FmnistVitConfig()
# QUICK: about a minute; for trying things out, not for reporting
QUICK = replace(FULL, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128, pretrain_steps=200,
                expert_steps=120, batch_size=64, warmup_steps=20, train_limit=10000, eval_limit=2000, probe_steps=100,
                probe_train=1000)


def fashion_dir(cfg: FmnistVitConfig) -> Path:
    d = Path(cfg.fashion_dir or os.environ.get("MERGECORE_FASHION_MNIST") or FASHION_DEFAULT_DIR)
    missing = [f for f in FASHION_FILES.values() if not (d / f).is_file()]
    if missing:
        raise MergeError(
            f"Fashion-MNIST not found in {d} (missing {', '.join(missing)}); install it with "
            f"'apt-get install dataset-fashion-mnist' or set MERGECORE_FASHION_MNIST to a folder with the idx files"
        )
    return d


def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1797 images, values 0-16) as 28x28 uint8 images, MNIST-style."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MergeError("the digits data set comes with scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = torch.nn.functional.pad(x, (4, 4, 4, 4))
    images = x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()
    return images, d.target.astype(np.int64)


def processor_dict(cfg: FmnistVitConfig) -> dict[str, Any]:
    return {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 28, "width": 28},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [IMAGE_MEAN], "image_std": [IMAGE_STD],
    }


def vit_config(cfg: FmnistVitConfig, id2label: Optional[dict[int, str]] = None):
    import transformers as tf

    labels = id2label or {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
    return tf.ViTConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, image_size=28, patch_size=cfg.patch_size, num_channels=1,
        num_labels=cfg.num_labels, id2label=labels, label2id={v: k for k, v in labels.items()},
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=cfg.initializer_range,
    )


def save_checkpoint(model, out: Path, cfg: FmnistVitConfig) -> None:
    import json

    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(processor_dict(cfg), indent=2))


class FmnistVitBuilder(FamilyBuilder):
    name = "fmnist-vit"
    summary = "small ViT pretrained by rotation prediction; experts on Fashion-MNIST class subsets and digits"

    def make_config(self, quick: bool, overrides: Optional[dict[str, Any]] = None) -> FmnistVitConfig:
        return override_dataclass(QUICK if quick else FULL, overrides, "fmnist-vit")

    def build(self, out: Path, *, quick: bool, config: Any, progress: Optional[FamilyProgressCallback],
              cancel: CancelToken) -> dict[str, Any]:
        import transformers as tf

        cfg: FmnistVitConfig = config if config is not None else self.make_config(quick)
        stages = ["data", "pretrain"] + [f"expert {e.name}" for e in cfg.experts] + ["evaluate"]
        report = StageReporter(stages, progress)
        timings: dict[str, float] = {}

        # -- data ------------------------------------------------------------------------------
        t0 = time.time()
        report("data", 0, 1, "reading Fashion-MNIST and digits")
        fdir = fashion_dir(cfg)
        f_train_x = read_idx(fdir / FASHION_FILES["train_images"])
        f_train_y = read_idx(fdir / FASHION_FILES["train_labels"]).astype(np.int64)
        d_x, d_y = load_digits_28()
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(len(d_y))
        splits = {"test": perm[:DIGITS_TEST], "val": perm[DIGITS_TEST:DIGITS_TEST + DIGITS_VAL],
                  "train": perm[DIGITS_TEST + DIGITS_VAL:]}
        data_dir = out / "data"
        data_dir.mkdir()
        for split, idx in splits.items():
            idx = np.sort(idx)
            np.save(data_dir / f"digits-{split}-images.npy", d_x[idx])
            np.save(data_dir / f"digits-{split}-labels.npy", d_y[idx])
        lim = cfg.train_limit
        pools = {
            "fashion": (f_train_x[:FASHION_TRAIN_ROWS][:lim], f_train_y[:FASHION_TRAIN_ROWS][:lim]),
            "digits": (d_x[np.sort(splits["train"])][:lim], d_y[np.sort(splits["train"])][:lim]),
        }
        prep = ImagePrep.from_dicts(processor_dict(cfg), {"num_channels": 1, "image_size": 28})
        tensors = {k: (prep(x), torch.as_tensor(y)) for k, (x, y) in pools.items()}
        self._write_tasks(out, cfg, fdir)
        timings["data"] = time.time() - t0
        report("data", 1, 1, f"{len(pools['fashion'][1])} Fashion-MNIST + {len(pools['digits'][1])} digits training images")

        # -- base: rotation pretraining -------------------------------------------------------------
        t0 = time.time()
        torch.manual_seed(cfg.seed)
        rot_labels = {0: "rot0", 1: "rot90", 2: "rot180", 3: "rot270"}
        rot_labels.update({i: f"unused_{i}" for i in range(4, cfg.num_labels)})
        base = tf.ViTForImageClassification(vit_config(cfg, rot_labels))
        pre_images = torch.cat([tensors["fashion"][0], tensors["digits"][0]])
        stats = training.train(
            base, training.rotation_batches(pre_images, cfg.batch_size), steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
            weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, seed=cfg.seed, num_outputs=4,
            on_step=lambda s, n, loss: report("pretrain", s, n, "rotation prediction", loss=loss), cancel=cancel)
        rot_acc = self._rotation_accuracy(base, fdir, out, cfg, prep, cancel)
        save_checkpoint(base, out / "base", cfg)
        timings["pretrain"] = time.time() - t0
        report("pretrain", cfg.pretrain_steps, cfg.pretrain_steps, f"rotation accuracy {rot_acc:.3f}")
        info: dict[str, Any] = {
            "name": self.name, "summary": self.summary, "config": cfg.as_dict(),
            "base": {"path": "base", "objective": "rotation prediction (4-way) on the training images of both data sets",
                     "pretrain_steps": stats.steps, "final_loss": round(stats.last_loss, 4),
                     "rotation_accuracy_val": round(rot_acc, 4)},
            "experts": {},
            "data": {"fashion_mnist": str(fdir), "fashion_train_rows": [0, FASHION_TRAIN_ROWS],
                     "fashion_val_rows": [FASHION_TRAIN_ROWS, 60000], "digits": "sklearn.datasets.load_digits, 28x28",
                     "digits_split": {k: int(len(v)) for k, v in splits.items()}},
            "versions": _versions(),
        }

        # -- experts ----------------------------------------------------------------------------
        for i, e in enumerate(cfg.experts):
            t0 = time.time()
            stage = f"expert {e.name}"
            names = FASHION_CLASSES if e.dataset == "fashion" else [str(d) for d in range(10)]
            id2label = {c: names[c] for c in range(cfg.num_labels)}
            model = tf.ViTForImageClassification.from_pretrained(str(out / "base"), dtype=torch.float32)
            model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
            g = torch.Generator().manual_seed(cfg.seed * 1000 + i + 1)
            with torch.no_grad():
                model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
                model.classifier.bias.zero_()
            x, y = tensors[e.dataset]
            st = self._train_expert(model, x, y, e, cfg, i, stage, report, cancel)
            save_checkpoint(model, out / f"expert_{e.name}", cfg)
            timings[stage] = time.time() - t0
            info["experts"][e.name] = {"path": f"expert_{e.name}", "dataset": e.dataset, "classes": list(e.classes),
                                       "class_names": [names[c] for c in e.classes], "steps": st.steps,
                                       "final_loss": round(st.last_loss, 4), "train_examples": int(np.isin(y.numpy(), e.classes).sum())}
            report(stage, cfg.expert_steps, cfg.expert_steps, f"final loss {st.last_loss:.3f}")

        # -- evaluate: each expert on its own task, the frozen base by linear probes ---------------
        t0 = time.time()
        self._evaluate(out, cfg, info, tensors, prep, report, cancel)
        timings["evaluate"] = time.time() - t0
        info["stage_seconds"] = {k: round(v, 2) for k, v in timings.items()}
        info["tasks"] = {"test": "tasks.yml", "val": "tasks-val.yml"}
        return info

    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _train_expert(model, x, y, e: ExpertSpec, cfg: FmnistVitConfig, i: int, stage: str, report,
                      cancel: CancelToken) -> training.TrainStats:
        """Fine-tune on the expert's classes; logits of the other classes are left out of the loss.

        Targets are the positions of the labels in `e.classes`, so the loss uses
        logits[:, classes] -- the same restriction the task applies when it is scored.
        """
        classes = list(e.classes)
        return training.train(model, training.class_batches(x, y, cfg.batch_size, classes), steps=cfg.expert_steps,
                              lr=cfg.expert_lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                              seed=cfg.seed * 1000 + i + 1, classes=classes,
                              on_step=lambda s, n, loss: report(stage, s, n, "fine-tuning", loss=loss), cancel=cancel)

    @staticmethod
    def _rotation_accuracy(model, fdir: Path, out: Path, cfg: FmnistVitConfig, prep: ImagePrep,
                           cancel: CancelToken, n: int = 2000) -> float:
        """Rotation accuracy on validation images (Fashion-MNIST val rows and digits val)."""
        n = min(n, cfg.eval_limit or n)
        fx = read_idx(fdir / FASHION_FILES["train_images"])[FASHION_TRAIN_ROWS:FASHION_TRAIN_ROWS + n]
        dx = np.load(out / "data" / "digits-val-images.npy")
        imgs = prep(np.concatenate([fx, dx]))
        correct = 0
        total = 0
        model.eval()
        with torch.no_grad():
            for k in range(4):
                cancel.check()
                x = torch.rot90(imgs, k, dims=(-2, -1))
                for j in range(0, len(x), cfg.eval_batch_size):
                    logits = model(pixel_values=x[j:j + cfg.eval_batch_size]).logits[:, :4]
                    correct += int((logits.argmax(-1) == k).sum())
                    total += len(logits)
        return correct / max(1, total)

    @staticmethod
    def _write_tasks(out: Path, cfg: FmnistVitConfig, fdir: Path) -> None:
        for split, fname in (("test", "tasks.yml"), ("val", "tasks-val.yml")):
            tasks = []
            for e in cfg.experts:
                if e.dataset == "fashion":
                    if split == "test":
                        data: dict[str, Any] = {"images": str(fdir / FASHION_FILES["test_images"]),
                                                "labels": str(fdir / FASHION_FILES["test_labels"])}
                    else:
                        data = {"images": str(fdir / FASHION_FILES["train_images"]),
                                "labels": str(fdir / FASHION_FILES["train_labels"]),
                                "range": [FASHION_TRAIN_ROWS, 60000]}
                    desc = "Fashion-MNIST " + ", ".join(FASHION_CLASSES[c] for c in e.classes)
                else:
                    data = {"images": f"data/digits-{split}-images.npy", "labels": f"data/digits-{split}-labels.npy"}
                    desc = "scikit-learn digits (8x8 upsampled to 28x28), 10 classes"
                if cfg.eval_limit:
                    data["max_examples"] = cfg.eval_limit
                task: dict[str, Any] = {"name": e.name, "kind": "classification", "description": f"{desc} ({split} split)",
                                        "data": data}
                if e.dataset == "fashion" or list(e.classes) != list(range(cfg.num_labels)):
                    task["classes"] = list(e.classes)
                task["head_from"] = f"expert_{e.name}"
                tasks.append(task)
            header = (f"# fmnist-vit tasks ({split} split). Each task is scored with its own expert's classifier head\n"
                      f"# (head_from) on the evaluated body; data paths are relative to this folder or absolute.\n")
            (out / fname).write_text(header + yaml.safe_dump({"tasks": tasks}, sort_keys=False, default_flow_style=None))

    def _evaluate(self, out: Path, cfg: FmnistVitConfig, info: dict[str, Any], tensors, prep: ImagePrep, report,
                  cancel: CancelToken) -> None:
        from mergecore.eval.evaluator import Evaluator
        from mergecore.models import load_model
        from mergecore.eval.tasks import load_tasks

        tasks = load_tasks(out / "tasks.yml")
        ev = Evaluator(tasks, batch_size=cfg.eval_batch_size, processor_from=out / "base")
        n = len(cfg.experts) + (1 if cfg.probe_steps else 0)
        for i, e in enumerate(cfg.experts):
            report("evaluate", i, n, f"expert {e.name} on its task")
            r = ev.evaluate(out / f"expert_{e.name}", tasks=[e.name], cancel=cancel)
            info["experts"][e.name]["test_accuracy"] = round(r.scores[e.name], 4)
            info["experts"][e.name]["test_examples"] = r[e.name].n
        if cfg.probe_steps:
            report("evaluate", len(cfg.experts), n, "linear probes on the frozen base")
            base = load_model(out / "base")
            for e in cfg.experts:
                cancel.check()
                task = ev.task(e.name)
                tx, ty = tensors[e.dataset]
                keep = torch.as_tensor(np.flatnonzero(np.isin(ty.numpy(), e.classes))[: cfg.probe_train])
                lut = {c: j for j, c in enumerate(e.classes)}
                train_f = training.features(base, tx[keep], cancel=cancel)
                train_y = torch.as_tensor([lut[int(v)] for v in ty[keep]])
                test_imgs = task.prepare(ev.resources(base, out / "base")).data["pixel_values"]
                test_f = training.features(base, test_imgs, cancel=cancel)
                test_y = torch.as_tensor([lut[int(v)] for v in task.labels()])
                acc = training.linear_probe(train_f, train_y, test_f, test_y, len(e.classes), steps=cfg.probe_steps,
                                            seed=cfg.seed)
                info["experts"][e.name]["base_linear_probe_accuracy"] = round(acc, 4)
        report("evaluate", n, n, "done")


def _versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "numpy": np.__version__}
    try:
        import sklearn

        out["scikit-learn"] = sklearn.__version__
    except ImportError:  # pragma: no cover
        pass
    return out
