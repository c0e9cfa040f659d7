"""Offline corpus builders (english.py, multilingual.py): Debian packages fetched with apt-get and
turned into documents. Reached only from the CLI (`lmjax data corpus|multilingual`, `lmjax
tokenizer`); training reads what they write through lmjax/data like any other text."""
