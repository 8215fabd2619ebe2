from tttlm.cli import run

run()
