"""Everything that imports ComfyUI: node schemas (``train``, ...), their registration
(``extension``) and the ModelPatcher bridge (``bridge``). ``spec`` is plain data."""
