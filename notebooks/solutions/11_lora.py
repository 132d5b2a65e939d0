"""Solutions to the exercises for notebooks/11_lora (for teachers; the notebook comes from another branch)."""

rank, hidden, layers = 8, 640, 18
q_out, v_out = 4 * 256, 1 * 256
ANSWERS = {"lora.1": layers * (rank * (hidden + q_out) + rank * (hidden + v_out)), "lora.2": 16 / 8}
