"""How a spec becomes fast code: lowering, the op vocabulary, fusion passes, Inductor."""
