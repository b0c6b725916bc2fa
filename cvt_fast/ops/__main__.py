"""`python -m cvt_fast.ops`: print the backend table (Markdown) that README.md's Backends section shows."""
from cvt_fast.ops.backends import markdown_table

print(markdown_table())
