"""Prune a causal LM with Wanda in 16x16 blocks, then evaluate it: ``dense_ft.prune`` as a script.

    python main_block.py --model meta-llama/Llama-2-7b-hf --sparsity_ratio 0.2 --save DIR --save_model DIR/pruned_model
"""

from dense_ft.prune import main

if __name__ == "__main__":
    main()
