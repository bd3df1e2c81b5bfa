fn main() -> anyhow::Result<()> {
    tunnel_server::cli::main()
}
