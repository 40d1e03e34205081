// iBOT-vMF and iBOT (a ViT with blockwise masking and masked patch prediction):
//
//     swift run -c release iBOTvMF            # iBOT-vMF on the built-in shapes dataset
//     swift run -c release iBOTvMF --help     # every option
import KappaCommands

KappaCommand.name = "iBOTvMF"
KappaCommand.defaultMethod = .ibotVMF
HostSetup.useFastestBLASKernels()
HostSetup.applyFaultInjection()
HostSetup.joinProcesses()
KappaCommand.main()
