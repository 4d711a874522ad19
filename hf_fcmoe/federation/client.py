"""What a client does, independent of the engine: prepare its data once, train a round, evaluate a state.

The in-process simulation holds one `ClientWorker` for all clients (one model in memory, adapter
states swapped in and out); a Flower ClientApp builds one per message. Both go through the same code.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import datasets
from datasets import Dataset
from peft import PeftModel
from transformers import PrinterCallback
from trl import SFTTrainer

from hf_fcmoe.aggregation.types import ClientUpdate, State
from hf_fcmoe.config import FederatedMoEConfig
from hf_fcmoe.data.formatting import DEFAULT_TEMPLATE, fit_prompts_to_length
from hf_fcmoe.metrics.loss import eval_loss
from hf_fcmoe.training.trainer import FederatedMoETrainer, load_adapter_state


@dataclass
class PreparedSplits:
    """A client's tokenized train/eval rows (SFTTrainer's own preparation, done once)."""

    train: Dataset
    eval: Dataset
    validation: Dataset | None = None  # held out of train to choose retention lambda (federation/lambda_choice.py)


def round_seed(base_seed: int, round_index: int, client_index: int) -> int:
    """The local-training seed of one client in one round: fixed by (seed, round, client), so resume is exact."""
    return base_seed + 1000 * round_index + client_index


class ClientWorker:
    """Trains and evaluates adapter states on one shared `PeftModel`."""

    def __init__(self, model: PeftModel, tokenizer, config: FederatedMoEConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        # Trainer's output_dir of the local rounds (nothing is saved there); removed with the worker, without the
        # ResourceWarning an unclosed TemporaryDirectory raises at exit
        self._scratch = tempfile.mkdtemp(prefix="hf_fcmoe_local_")
        weakref.finalize(self, shutil.rmtree, self._scratch, ignore_errors=True)
        self.collator = None
        self.truncated_prompts = 0  # classification rows whose input text was shortened to fit max_length

    def local_args(self, seed: int, prepared: bool = True) -> FederatedMoEConfig:
        """A copy of the run config set up for one local round (no checkpoints, no per-step printing).

        `prepared`: the datasets are already tokenized by `prepare`, so SFTTrainer skips its preparation.
        """
        args = copy.copy(self.config)
        args.dataset_kwargs = {**(self.config.dataset_kwargs or {}), "skip_prepare_dataset": prepared}
        args.output_dir = self._scratch
        args.seed = seed
        args.save_strategy = "no"
        args.disable_tqdm = True
        args.push_to_hub = False
        args.report_to = "none"  # the federation logs its curves once per round (reporting/trackers.py)
        return args

    def prepare(self, train: Dataset, eval: Dataset, validation: Dataset | None = None) -> PreparedSplits:
        """Tokenize a client's splits with SFTTrainer's own preparation (text, prompt/completion or messages)."""
        if self.config.task == "classification":  # long prompts: cut the input text, never the label
            template = self.config.prompt_template or DEFAULT_TEMPLATE
            train, cut_train = fit_prompts_to_length(train, self.tokenizer, self.config.max_length, template)
            eval, cut_eval = fit_prompts_to_length(eval, self.tokenizer, self.config.max_length, template)
            self.truncated_prompts += cut_train + cut_eval
            if validation is not None:
                validation, cut_validation = fit_prompts_to_length(
                    validation, self.tokenizer, self.config.max_length, template
                )
                self.truncated_prompts += cut_validation
        datasets.disable_progress_bars()
        try:
            trainer = SFTTrainer(
                self.model,
                args=self.local_args(self.config.seed, prepared=False),
                train_dataset=train,
                eval_dataset=eval if validation is None else {"eval": eval, "validation": validation},
                processing_class=self.tokenizer,
            )
        finally:
            datasets.enable_progress_bars()
        if len(trainer.train_dataset) == 0:
            raise ValueError(
                f"no training rows left after tokenization (max_length={self.config.max_length}): every example's "
                "loss tokens were truncated away; raise max_length or shorten the prompts"
            )
        self.collator = trainer.data_collator
        if validation is None:
            return PreparedSplits(train=trainer.train_dataset, eval=trainer.eval_dataset)
        prepared = trainer.eval_dataset
        return PreparedSplits(trainer.train_dataset, prepared["eval"], prepared["validation"])

    def train(
        self,
        client_id: str,
        splits: PreparedSplits,
        start_state: State,
        seed: int,
        retained: State | None = None,
        callbacks: list | None = None,
    ) -> ClientUpdate:
        """One local round from `start_state` (which already includes `retained`, if any); `callbacks` are extra
        `TrainerCallback`s (the engine's time limit)."""
        trainer = FederatedMoETrainer(
            self.model,
            args=self.local_args(seed),
            train_dataset=splits.train,
            processing_class=self.tokenizer,
            client_id=client_id,
            start_state=start_state,
            retained=retained,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)
        return trainer.train_round()

    def evaluate(self, state: State, dataset: Dataset) -> float:
        load_adapter_state(self.model, state)
        return eval_loss(self.model, dataset, self.collator, self.config.eval_batch_size)
