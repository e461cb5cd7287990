"""One rank of the DDP guard test: evaluate() before train() under torchrun must not train the replicas apart."""

import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from tiny_models import tiny_llama, zero_random_blocks
from transformers import TrainingArguments

from dense_ft.sparse_trainer import SparseTrainer

ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
data = Dataset.from_dict({"input_ids": ids, "labels": ids})
model = tiny_llama()
zero_random_blocks(model)
args = TrainingArguments(sys.argv[1], max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to=[],
                         save_strategy="no", disable_tqdm=True)
trainer = SparseTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
trainer.evaluate()  # from transformers 5.24 this leaves the model unwrapped by DDP
try:
    trainer.train()
except RuntimeError as error:
    print(f"refused: {error}", flush=True)
    sys.exit(3)
# Trained: each rank saw its own half of the data, so only synchronized gradients give equal weights.
weights = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
replicas = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
dist.all_gather(replicas, weights)
print("replicas equal" if all(torch.equal(replica, weights) for replica in replicas) else "replicas differ",
      flush=True)
