"""``python -m equiaudit …`` runs the command line (and so does ``torchrun -m equiaudit audit …``)."""

from equiaudit.cli.main import app

if __name__ == "__main__":
    app(prog_name="equiaudit")
