"""accuquant-pl command line: ``python main.py {fit,validate,test,predict} --config configs/<x>.yaml``."""

from accuquant_pl.cli import script_main

if __name__ == "__main__":
    script_main()
