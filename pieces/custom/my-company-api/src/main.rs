//! `my-company-api` as a program: workers start it and speak piece protocol v1 with it.

fn main() -> std::process::ExitCode {
    piecework_sdk::serve(piecework_piece_my_company_api::piece())
}
