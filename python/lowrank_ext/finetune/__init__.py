"""Fine-tuning workflows behind ``lowrank-ext finetune``: data, training, reports."""
