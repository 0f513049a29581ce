"""`python app.py` is `python -m rpo_app serve`: the web app on http://127.0.0.1:7860."""
import sys

from rpo_app.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
